"""What the kernel hook costs per ioctl, side by side in one run (root, /dev/kvm, BCC).

    .venv/bin/python benchmarks/bench_ioctl_hook.py [--loops N] [--rounds R]

A gcc-built loop issues, N times each: a non-KVM ioctl (FIONREAD on a pipe), a KVM
system ioctl (KVM_CHECK_EXTENSION), a vCPU read (KVM_GET_REGS, not a state write) and a
vCPU state write (KVM_SET_REGS).  It runs (a) with no BPF loaded, (b) with qtrace's
session loaded but this process not tracked (every other process on a host), and (c) with
this process tracked (a traced QEMU).  Median ns per ioctl over R rounds.
A benchmark, not a test: shared machines are noisy; compare columns of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from qtrace_bpf import abi  # noqa: E402

LOOP_C = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int p[2], avail;
    if (pipe(p)) return 1;
    int kvm = open("/dev/kvm", O_RDWR);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    struct kvm_regs regs;
    if (kvm < 0 || vm < 0 || vcpu < 0 || ioctl(vcpu, KVM_GET_REGS, &regs)) return 2;
    printf("ready\n");
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1) return 3;
    double t0 = now();
    for (long i = 0; i < n; i++) ioctl(p[0], FIONREAD, &avail);
    double t1 = now();
    for (long i = 0; i < n; i++) ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY);
    double t2 = now();
    for (long i = 0; i < n; i++) ioctl(vcpu, KVM_GET_REGS, &regs);
    double t3 = now();
    for (long i = 0; i < n; i++) ioctl(vcpu, KVM_SET_REGS, &regs);
    double t4 = now();
    printf("%f %f %f %f\n", (t1 - t0) / n, (t2 - t1) / n, (t3 - t2) / n, (t4 - t3) / n);
    return 0;
}
"""
COLUMNS = ("FIONREAD (pipe)", "KVM_CHECK_EXTENSION", "KVM_GET_REGS", "KVM_SET_REGS")


def build(tmp: str) -> str:
    src, exe = os.path.join(tmp, "loop.c"), os.path.join(tmp, "loop")
    with open(src, "w") as f:
        f.write(LOOP_C)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def run_once(exe: str, loops: int, prog=None, track: bool = False) -> list[float]:
    p = subprocess.Popen([exe, str(loops)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "ready"
    if track and prog is not None:
        prog.maps.insert_proc(p.pid, abi.USER_VM_ID_BASE + p.pid, boot_done=True)
    p.stdin.write("g")
    p.stdin.close()
    out = p.stdout.readline()
    p.wait()
    if track and prog is not None:
        prog.maps.delete_proc(p.pid)
        prog.maps.delete_vms([abi.USER_VM_ID_BASE + p.pid])
    return [float(x) for x in out.split()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loops", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from qtrace_bpf.catalog import load_catalog
    from qtrace_bpf.program import QtraceProgram

    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        rows: dict[str, list[list[float]]] = {"no BPF": [], "hook, untracked": [],
                                              "hook, tracked": []}
        half = max(1, args.rounds // 2)
        for _ in range(half):  # baseline before loading...
            rows["no BPF"].append(run_once(exe, args.loops))
        s = QtraceProgram(load_catalog(), write_events=True)
        try:
            hook = s.hook_mode
            for _ in range(args.rounds):  # interleaved, so drift hits both rows alike
                rows["hook, untracked"].append(run_once(exe, args.loops, s))
                rows["hook, tracked"].append(run_once(exe, args.loops, s, track=True))
                s.poll(0)
                s.events.clear()
        finally:
            s.close()
        for _ in range(args.rounds - half):  # ...and after unloading
            rows["no BPF"].append(run_once(exe, args.loops))
    print(f"kernel hook: {hook}; {args.loops} ioctls per column, median of {args.rounds} "
          "rounds, ns per ioctl")
    print(f"{'':<18}" + "".join(f"{c:>22}" for c in COLUMNS))
    base = [statistics.median(r[i] for r in rows["no BPF"]) for i in range(4)]
    for name, runs in rows.items():
        med = [statistics.median(r[i] for r in runs) for i in range(4)]
        cells = "".join(f"{m:>14.0f} ({m - b:+5.0f})" for m, b in zip(med, base, strict=True))
        print(f"{name:<18}{cells}")


if __name__ == "__main__":
    main()
