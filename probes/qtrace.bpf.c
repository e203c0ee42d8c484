// SPDX-License-Identifier: Apache-2.0
// qtrace: when, on which vCPU and in which lifecycle phase does QEMU write vCPU state
// into KVM?  Uprobes on QEMU lifecycle functions open/close phase windows; one kernel
// hook on KVM ioctls counts (and decodes) the state writes.  Counting happens here, in
// maps read by user space at its own pace; the ring buffer carries the daemon only exec
// and exit, and watch every event.
//
// The kernel hook is chosen at compile time: QTRACE_HOOK_FENTRY, QTRACE_HOOK_KPROBE or
// QTRACE_HOOK_TRACEPOINT (syscalls:sys_enter/exit_ioctl).  All three feed ioctl_enter()
// and ioctl_exit(), keyed by the syscall's fd so a vCPU is known by its fd, whichever
// thread issues the ioctl.

#include <uapi/linux/ptrace.h>
#include <uapi/linux/kvm.h>
#include "qtrace.h"

#define MSR_APIC_BASE     0x1b
#define MSR_TSC           0x10
#define MSR_TSC_DEADLINE  0x6e0
#define MAX_MSRS 128

// Map sizes: -D from user space (config: max_vms, vCPUs per VM); these are the defaults.
#ifndef MAX_VMS
#define MAX_VMS 1024
#endif
#ifndef MAX_VCPUS
#define MAX_VCPUS 64
#endif
#define MAX_THREADS (MAX_VMS * (MAX_VCPUS + 8))
#define MAX_VCPU_ROWS (MAX_VMS * MAX_VCPUS)

// A watched ioctl between syscall entry and exit (internal: user space never reads it).
struct inflight {
    u64 arg;
    u32 vm;
    u32 fd;
    u32 cmd;
    s32 vcpu;
    u32 phase;
    u32 cause;
    u32 level;
    u32 have;
    u64 vals[NVALS];
};

// Every map is pinned under QTRACE_PIN_DIR when it is defined (the daemon): a restarted
// daemon, and the programs its predecessor left attached, share the same maps, so counts
// continue.  BCC reuses a pinned map if there is one, else creates and pins it.
#ifdef QTRACE_PIN_DIR
#define QT_PIN(type, name) type ":" QTRACE_PIN_DIR "/" #name
#else
#define QT_PIN(type, name) type
#endif
#define QT_HASH(k, v, name, max, flags) BPF_F_TABLE(QT_PIN("hash", name), k, v, name, max, flags)
#define QT_ARRAY(v, name, max) BPF_F_TABLE(QT_PIN("array", name), int, v, name, max, 0)
#define QT_PERCPU_ARRAY(v, name, max) \
    BPF_F_TABLE(QT_PIN("percpu_array", name), int, v, name, max, 0)

// Tracked QEMU processes (the BPF-side pid filter), their VM id and phase windows.
QT_HASH(u32, struct proc_state, procs, MAX_VMS * 2, 0);
QT_ARRAY(struct probe_cfg, probe_cfg, MAX_SLOTS);
QT_HASH(u32, u32, watched, 256, 0);                                   // ioctl cmd -> 1
QT_HASH(u32, u32, thread_level, MAX_THREADS, 0);                      // tid -> put level
QT_HASH(u32, struct inflight, inflight, MAX_THREADS, 0);              // tid -> ioctl in flight
QT_HASH(struct vcpu_key, s32, vcpu_fds, MAX_VCPU_ROWS, BPF_F_NO_PREALLOC);
QT_HASH(struct val_key, u64, last_val, MAX_VCPU_ROWS * NVALS, BPF_F_NO_PREALLOC);
QT_HASH(struct val_key, u64, value_changes, MAX_VCPU_ROWS * NVALS, BPF_F_NO_PREALLOC);
QT_HASH(struct count_key, u64, write_counts, MAX_VCPU_ROWS * 48, BPF_F_NO_PREALLOC);
QT_HASH(struct err_key, u64, error_counts, MAX_VMS * 32, BPF_F_NO_PREALLOC);
QT_HASH(struct lc_key, u64, lifecycle_counts, MAX_VMS * MAX_SLOTS, BPF_F_NO_PREALLOC);
QT_HASH(struct reset_key, u64, reset_counts, MAX_VMS * NCAUSES * 2, BPF_F_NO_PREALLOC);
QT_HASH(struct step_key, u64, step_durations, MAX_VMS * NSTEPS * (NDUR_BUCKETS + 2),
        BPF_F_NO_PREALLOC);
QT_ARRAY(u64, update_failed, NMAPS);                                  // M_* -> failed inserts
QT_ARRAY(u64, events_lost, NKINDS);                                   // K_* -> events dropped
QT_PERCPU_ARRAY(u32, next_vm, 1);                                     // VM ids, per CPU
// How many inflight entries exist: an ioctl exit (every process's, under the tracepoint
// hook) reads this array slot, inlined by the verifier, before any hash lookup.
QT_ARRAY(s64, inflight_n, 1);

// BPF_RINGBUF_OUTPUT(events, 64), spelled out so that it can be pinned like the rest.
struct events_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/" QT_PIN("ringbuf", events))))
struct events_table_t events = {.max_entries = 64 * PAGE_SIZE};

// The current task's ids (tgid << 32 | pid) as the daemon sees them.  In a PID namespace
// that is not the host's (a container, a Kubernetes DaemonSet without hostPID), user space
// passes that namespace's nsfs dev/inode: ids are then the namespace's own, and a task
// outside it reads 0 (not ours: never tracked).
static __always_inline u64 current_pid_tgid(void) {
#ifdef QTRACE_PIDNS_INO
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(QTRACE_PIDNS_DEV, QTRACE_PIDNS_INO, &ns, sizeof(ns)))
        return 0;
    return ((u64)ns.tgid << 32) | ns.pid;
#else
    return bpf_get_current_pid_tgid();
#endif
}

// An insert that a full map refused is counted, never silent.
static __always_inline void failed(u32 map_id) {
    u64 *n = update_failed.lookup(&map_id);
    if (n)
        __sync_fetch_and_add(n, 1);
}

// Counters: lookup_or_try_init gives NULL only when the map is full.
static __always_inline void count_or_fail(u64 *n, u32 map_id) {
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        failed(map_id);
}

static __always_inline u32 phase_of(struct proc_state *ps, u32 *cause) {
    *cause = 0;
    if (!ps->boot_done)
        return PH_BOOT;
    // A reset outranks a migration window: a machine reset is always the truth for its
    // writes, even if a migration window were left open (it ends at the incoming
    // migration's end or failure: migration_incoming_state_destroy).
    if (ps->windows & W_RESET) {
        *cause = ps->cause;
        return PH_RESET;
    }
    if (ps->windows & W_MIGRATION)
        return PH_MIGRATION;
    if (ps->hotplug_depth)
        return PH_HOTPLUG;
    return PH_RUNTIME;
}

// ---------------------------------------------------------------- KVM ioctls

static __always_inline void decode_msrs(struct inflight *in) {
    u32 n = 0;
    bpf_probe_read_user(&n, sizeof(n), (void *)in->arg);
    for (int i = 0; i < MAX_MSRS; i++) {
        if (i >= n)
            break;
        struct kvm_msr_entry entry = {};
        bpf_probe_read_user(&entry, sizeof(entry),
                            (u8 *)in->arg + sizeof(struct kvm_msrs) + i * sizeof(entry));
        if (entry.index == MSR_APIC_BASE) {
            in->vals[V_APIC_BASE] = entry.data;
            in->have |= 1 << V_APIC_BASE;
        } else if (entry.index == MSR_TSC) {
            in->vals[V_MSR_TSC] = entry.data;
            in->have |= 1 << V_MSR_TSC;
        } else if (entry.index == MSR_TSC_DEADLINE) {
            in->vals[V_MSR_TSC_DEADLINE] = entry.data;
            in->have |= 1 << V_MSR_TSC_DEADLINE;
        }
    }
}

// Events are built on the stack and copied with ringbuf_output, so that BCC records
// `struct event` as the ring buffer's type: user space takes the layout from it.
static __always_inline void init_event(struct event *e, u32 kind, u32 vm, u32 tgid, u32 tid) {
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->tgid = tgid;
    e->tid = tid;
    e->vm = vm;
    e->kind = kind;
    e->vcpu = -1;
}

static __always_inline void submit(struct event *e) {
    if (events.ringbuf_output(e, sizeof(*e), 0) < 0) {
        u32 kind = e->kind;
        u64 *lost = events_lost.lookup(&kind);
        if (lost)
            __sync_fetch_and_add(lost, 1);
    }
}

static __always_inline void emit_simple(u32 kind, u32 vm, u32 tgid, u32 tid) {
    struct event e;
    init_event(&e, kind, vm, tgid, tid);
    submit(&e);
}

#ifdef QTRACE_DISCOVERY
// Start tracking a QEMU process under a new kernel-numbered VM id; exec resets its state
// (windows, vCPU fds and last values belong to the old id).
static __always_inline void track_new(u32 tgid, u32 tid) {
    if (!tgid)
        return;  // outside the daemon's PID namespace
    // id = (this CPU's exec count << 10) | CPU: unique without atomics (this LLVM cannot
    // use fetch-and-add's result); 2^21 execs per CPU before an id (long forgotten) repeats.
    u32 zero = 0;
    u32 *next = next_vm.lookup(&zero);
    if (!next)
        return;
    *next += 1;
    struct proc_state st = {};
    st.vm = ((*next << 10) | (bpf_get_smp_processor_id() & 0x3ff)) & (USER_VM_ID_BASE - 1);
    if (st.vm < 1024)
        st.vm |= 1 << 30;  // wrapped: stay clear of 0 and CPU-only values
    if (procs.update(&tgid, &st) < 0)
        failed(M_PROCS);
    emit_simple(K_EXEC, st.vm, tgid, tid);
}
#endif

static __always_inline int ioctl_enter(u32 fd, u32 cmd, u64 arg) {
    if (_IOC_TYPE(cmd) != KVMIO)
        return 0;
    u64 pid_tgid = current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    struct proc_state *ps = procs.lookup(&tgid);
#ifdef QTRACE_DISCOVERY
    if (!ps && cmd == KVM_CREATE_VM) {
        // A VMM that exec discovery did not recognise: track it from its first VM.
        track_new(tgid, tid);
        return 0;
    }
#endif
    if (!ps)
        return 0;
    if (!watched.lookup(&cmd))
        return 0;

    struct inflight in = {};
    in.arg = arg;
    in.vm = ps->vm;
    in.fd = fd;
    in.cmd = cmd;
    struct vcpu_key vk = {.vm = ps->vm, .fd = fd};
    s32 *vcpu = vcpu_fds.lookup(&vk);
    in.vcpu = vcpu ? *vcpu : -1;
    in.phase = phase_of(ps, &in.cause);
    u32 *level = thread_level.lookup(&tid);
    in.level = level ? *level : 0;

    if (cmd == KVM_SET_SREGS || cmd == KVM_SET_SREGS2) {
        // apic_base sits at the same offset in struct kvm_sregs and kvm_sregs2
        bpf_probe_read_user(&in.vals[V_APIC_BASE], 8,
                            (void *)(arg + offsetof(struct kvm_sregs, apic_base)));
        in.have |= 1 << V_APIC_BASE;
    } else if (cmd == KVM_SET_TSC_KHZ) {
        in.vals[V_TSC_KHZ] = arg;
        in.have |= 1 << V_TSC_KHZ;
    } else if (cmd == KVM_SET_MSRS) {
        decode_msrs(&in);
    }
    u32 zero = 0;
    s64 *n = inflight_n.lookup(&zero);
    if (inflight.update(&tid, &in) < 0)
        failed(M_INFLIGHT);
    else if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}

static __always_inline int ioctl_exit(s64 ret) {
    u32 zero = 0;
    s64 *n = inflight_n.lookup(&zero);
    if (!n || *n <= 0)
        return 0;  // no traced write in flight anywhere: most ioctl exits end here
    u64 pid_tgid = current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    struct inflight *p = inflight.lookup(&tid);
    if (!p)
        return 0;
    struct inflight in = *p;
    if (inflight.delete(&tid) == 0)
        __sync_fetch_and_add(n, -1);
    u64 zero64 = 0;

    u32 known = 0, changed = 0;
    if (ret < 0) {
        struct err_key ek = {.vm = in.vm, .cmd = in.cmd};
        count_or_fail(error_counts.lookup_or_try_init(&ek, &zero64), M_ERROR_COUNTS);
    } else {
        if (in.cmd == KVM_CREATE_VCPU) {
            struct vcpu_key vk = {.vm = in.vm, .fd = (u32)ret};
            s32 id = (s32)in.arg;
            if (vcpu_fds.update(&vk, &id) < 0)
                failed(M_VCPU_FDS);
            in.vcpu = id;
        }
        struct count_key ck = {.vm = in.vm, .vcpu = in.vcpu, .cmd = in.cmd, .phase = in.phase};
        count_or_fail(write_counts.lookup_or_try_init(&ck, &zero64), M_WRITE_COUNTS);
        for (int i = 0; i < NVALS; i++) {
            if (!(in.have & (1 << i)))
                continue;
            struct val_key vk = {.vm = in.vm, .vcpu = in.vcpu, .which = i};
            u64 *prev = last_val.lookup(&vk);
            if (prev) {
                known |= 1 << i;
                if (*prev != in.vals[i]) {
                    changed |= 1 << i;
                    if (i == V_APIC_BASE || i == V_TSC_KHZ)  // exported changes
                        count_or_fail(value_changes.lookup_or_try_init(&vk, &zero64),
                                      M_VALUE_CHANGES);
                }
            }
            if (last_val.update(&vk, &in.vals[i]) < 0)
                failed(M_LAST_VAL);
        }
    }

#ifdef QTRACE_WRITE_EVENTS
    // watch: every write is an event.  The daemon counts in maps only.
    struct event e;
    init_event(&e, K_STATE_WRITE, in.vm, tgid, tid);
    e.id = in.cmd;
    e.vcpu = in.vcpu;
    e.phase = in.phase;
    e.cause = in.cause;
    e.level = in.level;
    e.ret = ret;
    e.arg1 = in.arg;
    e.fd = in.fd;
    e.have = in.have;
    e.known = known;
    e.changed = changed;
    for (int i = 0; i < NVALS; i++)
        e.vals[i] = in.vals[i];
    submit(&e);
#endif
    return 0;
}

#if defined(QTRACE_HOOK_TRACEPOINT)
// Layout of syscalls:sys_enter_ioctl / sys_exit_ioctl (tracefs format, stable ABI).
struct sys_enter_ioctl_ctx {
    u64 common;
    s32 syscall_nr;
    u32 pad;
    u64 fd;
    u64 cmd;
    u64 arg;
};

struct sys_exit_ioctl_ctx {
    u64 common;
    s32 syscall_nr;
    u32 pad;
    s64 ret;
};

int tp_enter_ioctl(struct sys_enter_ioctl_ctx *ctx) {
    return ioctl_enter((u32)ctx->fd, (u32)ctx->cmd, ctx->arg);
}

int tp_exit_ioctl(struct sys_exit_ioctl_ctx *ctx) {
    return ioctl_exit(ctx->ret);
}
#endif

#if defined(QTRACE_HOOK_FENTRY) || defined(QTRACE_HOOK_KPROBE)
// Inside kvm_{vcpu,vm}_ioctl the fd is gone; read it from the syscall's saved registers.
static __always_inline u32 syscall_fd(void) {
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 fd = 0;
    bpf_probe_read_kernel(&fd, sizeof(fd), &regs->di);
    return (u32)fd;
}
#endif

#if defined(QTRACE_HOOK_FENTRY)
// Plain BPF_PROG functions, not KFUNC_PROBE: BCC would look kvm_* up in vmlinux's BTF only,
// and KVM is a module.  qtrace_bpf/bpf/fentry.py loads them against the module's BTF.
// Tracing programs must return 0 (the 6.12 verifier checks it).
#define QT_FENTRY(fn)                                                                      \
    BPF_PROG(fe_##fn, void *filp, unsigned int ioctl, unsigned long arg) {                 \
        ioctl_enter(syscall_fd(), ioctl, arg);                                             \
        return 0;                                                                          \
    }                                                                                      \
    BPF_PROG(fx_##fn, void *filp, unsigned int ioctl, unsigned long arg, long ret) {       \
        ioctl_exit(ret);                                                                   \
        return 0;                                                                          \
    }
QT_FENTRY(kvm_vcpu_ioctl)
QT_FENTRY(kvm_vm_ioctl)
#endif

#if defined(QTRACE_HOOK_KPROBE)
int kp_kvm_ioctl(struct pt_regs *ctx) {
    return ioctl_enter(syscall_fd(), (u32)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
}
int kretp_kvm_ioctl(struct pt_regs *ctx) {
    return ioctl_exit((s64)PT_REGS_RC(ctx));
}
#endif

// ---------------------------------------------------------------- QEMU uprobes

// Lifecycle and step events are for watch (QTRACE_WRITE_EVENTS: the live view).  The daemon
// counts lifecycle hits and step durations in maps; an event per hit would only wake it
// (a reset passes through a dozen probes) and cost each hit a 120-byte record.
static __always_inline void emit_lifecycle(u32 tgid, u32 tid, u32 id, struct proc_state *ps,
                                           u64 arg1, u64 arg2, u32 level) {
#ifdef QTRACE_WRITE_EVENTS
    struct event e;
    init_event(&e, K_LIFECYCLE, ps->vm, tgid, tid);
    e.id = id;
    e.phase = phase_of(ps, &e.cause);
    e.level = level;
    e.arg1 = arg1;
    e.arg2 = arg2;
    submit(&e);
#endif
}

// ---------------------------------------------------------------- step durations

static __always_inline u32 dur_bucket(u64 ns) {
    u64 us = ns / 1000;
#define LE(n) if (us <= DUR_BUCKET_##n##_US) return n;
    LE(0) LE(1) LE(2) LE(3) LE(4) LE(5) LE(6) LE(7) LE(8) LE(9) LE(10) LE(11) LE(12)
#undef LE
    return NDUR_BUCKETS;
}

static __always_inline void step_begin(struct proc_state *ps, u32 step, u64 now) {
    if (step < NSTEPS) {
        ps->step_start[step] = now;
        ps->step_end[step] = 0;
    }
}

// The step is over at `end` (0: it timed nothing): one histogram observation, one event.
static __always_inline void step_done(struct proc_state *ps, u32 step, u64 end, u32 tgid,
                                      u32 tid) {
    if (step >= NSTEPS)
        return;
    u64 start = ps->step_start[step];
    ps->step_start[step] = 0;
    if (!start || !end || end < start)
        return;
    u64 ns = end - start, zero64 = 0;
    struct step_key bk = {.vm = ps->vm, .step = step, .bucket = dur_bucket(ns)};
    count_or_fail(step_durations.lookup_or_try_init(&bk, &zero64), M_STEP_DURATIONS);
    struct step_key sk = {.vm = ps->vm, .step = step, .bucket = DUR_SUM};
    u64 *sum = step_durations.lookup_or_try_init(&sk, &zero64);
    if (sum)
        __sync_fetch_and_add(sum, ns);
    else
        failed(M_STEP_DURATIONS);
#ifdef QTRACE_WRITE_EVENTS
    struct event e;
    init_event(&e, K_STEP, ps->vm, tgid, tid);
    e.id = step;
    e.phase = step == S_RESET ? PH_RESET : step == S_HOTPLUG ? PH_HOTPLUG : PH_MIGRATION;
    e.cause = step == S_RESET ? ps->cause : 0;
    e.arg1 = ns;
    submit(&e);
#endif
}

// A put returned on thread `tid`: it may end the reset or hotplug step.
static __always_inline void put_returned(struct proc_state *ps, u32 tid) {
    u32 *level = thread_level.lookup(&tid);
    if (!level)
        return;
    u64 now = bpf_ktime_get_ns();
    if (*level == 2 && ps->step_start[S_RESET])
        ps->step_end[S_RESET] = now;  // the last one wins
    else if (*level == 3 && ps->step_start[S_HOTPLUG] && !ps->step_end[S_HOTPLUG])
        ps->step_end[S_HOTPLUG] = now;  // the first one wins
}

// trust_args: 0 for an entry on a GCC clone or an inlined instance, whose registers need
// not hold the arguments (cause and level are then unknown, never guessed).
static __always_inline int on_probe(struct pt_regs *ctx, u32 id, int is_return,
                                    int trust_args) {
    u64 pid_tgid = current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    struct proc_state *ps = procs.lookup(&tgid);
    if (!ps)
        return 0;
    struct probe_cfg *cfg = probe_cfg.lookup(&id);
    if (!cfg)
        return 0;
    u32 action = cfg->action;
    u64 zero64 = 0;

    if (is_return) {
        if (action == ACT_RESET) {
            ps->windows &= ~W_RESET;
            u64 end = ps->step_end[S_RESET] ? ps->step_end[S_RESET] : bpf_ktime_get_ns();
            step_done(ps, S_RESET, end, tgid, tid);
        } else if (action == ACT_HOTPLUG) {
            ps->hotplug_depth -= ps->hotplug_depth ? 1 : 0;
            if (!ps->hotplug_depth)
                step_done(ps, S_HOTPLUG, ps->step_end[S_HOTPLUG], tgid, tid);
        } else if (action == ACT_BOOT_DONE) {
            ps->boot_done = 1;
        } else if (action == ACT_PUT) {
            put_returned(ps, tid);
            thread_level.delete(&tid);
        }
        return 0;
    }

    u64 arg1 = ARG_UNKNOWN, arg2 = ARG_UNKNOWN;
    if (trust_args) {
        arg1 = PT_REGS_PARM1(ctx);
        arg2 = PT_REGS_PARM2(ctx);
    }
    u32 level = 0;
#define ARG(n) ((n) == 1 ? arg1 : arg2)
    if (action == ACT_RESET) {
        u32 cause = trust_args ? (u32)ARG(RESET_CAUSE_ARG) : CAUSE_UNKNOWN;
        ps->cause = cause;
        ps->windows |= W_RESET;
        if (ps->boot_done) {
            // Boot-time reset (cause none) is part of boot; QMP emits no RESET for it.
            u64 now = bpf_ktime_get_ns();
            step_begin(ps, S_RESET, now);
            struct reset_key rk = {.vm = ps->vm, .cause = cause};
            count_or_fail(reset_counts.lookup_or_try_init(&rk, &zero64), M_RESET_COUNTS);
            if (cause == CAUSE_HOST_QMP_SYSTEM_RESET || cause == CAUSE_HOST_UI ||
                cause == CAUSE_HOST_ERROR) {
                ps->last_host_reset_ns = now;
            } else if (cause == CAUSE_GUEST_RESET && ps->last_host_reset_ns &&
                       now - ps->last_host_reset_ns < FOLLOWUP_NS) {
                struct reset_key fk = {.vm = ps->vm, .cause = cause | FOLLOWUP_FLAG};
                count_or_fail(reset_counts.lookup_or_try_init(&fk, &zero64), M_RESET_COUNTS);
                ps->last_host_reset_ns = 0;
            }
        }
    } else if (action == ACT_HOTPLUG) {
        if (!ps->hotplug_depth)
            step_begin(ps, S_HOTPLUG, bpf_ktime_get_ns());
        if (ps->hotplug_depth < 16)
            ps->hotplug_depth += 1;
    } else if (action == ACT_MIGRATION_BEGIN) {
        if (!(ps->windows & W_MIGRATION))
            step_begin(ps, S_MIGRATION, bpf_ktime_get_ns());
        ps->windows |= W_MIGRATION;
    } else if (action == ACT_MIGRATION_END) {
        ps->windows &= ~W_MIGRATION;
        step_done(ps, S_MIGRATION, bpf_ktime_get_ns(), tgid, tid);
    } else if (action == ACT_PUT) {
        level = trust_args ? (u32)ARG(PUT_LEVEL_ARG) : 0;  // 0: in a put, level unknown
        if (thread_level.update(&tid, &level) < 0)
            failed(M_THREAD_LEVEL);
    }

    struct lc_key lk = {.vm = ps->vm, .probe = id};
    count_or_fail(lifecycle_counts.lookup_or_try_init(&lk, &zero64), M_LIFECYCLE_COUNTS);
    emit_lifecycle(tgid, tid, id, ps, arg1, arg2, level);
    return 0;
}

#ifdef QTRACE_DISCOVERY
// ---------------------------------------------------------------- process discovery
// Track a QEMU from its exec, in the kernel: its boot phase is counted from the very first
// state write, without waiting for user space to notice the new pid.

static __always_inline int is_qemu_comm(const char *c) {
    // comm after exec is the file name, truncated to 15: "qemu-system-x86", "qemu-kvm"
    if (c[0] != 'q' || c[1] != 'e' || c[2] != 'm' || c[3] != 'u' || c[4] != '-')
        return 0;
    if (c[5] == 'k' && c[6] == 'v' && c[7] == 'm')
        return 1;
    return c[5] == 's' && c[6] == 'y' && c[7] == 's' && c[8] == 't' && c[9] == 'e' &&
           c[10] == 'm' && c[11] == '-';
}

int tp_sched_exec(void *ctx) {
    char comm[16] = {};
    bpf_get_current_comm(&comm, sizeof(comm));
    if (!is_qemu_comm(comm))
        return 0;
    u64 pid_tgid = current_pid_tgid();
    track_new(pid_tgid >> 32, (u32)pid_tgid);
    return 0;
}

int tp_sched_exit(void *ctx) {
    u64 pid_tgid = current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if ((u32)pid_tgid != tgid)
        return 0;  // a thread, not the process
    struct proc_state *ps = procs.lookup(&tgid);
    if (!ps)
        return 0;
    u32 vm = ps->vm;
    procs.delete(&tgid);
    emit_simple(K_EXIT, vm, tgid, tgid);
    return 0;
}
#endif

// Entry, return and blind-entry handlers per catalog slot; the slot's action is data.
#define SLOT(n)                                                                   \
    int qt_entry_##n(struct pt_regs *ctx) { return on_probe(ctx, n, 0, 1); }     \
    int qt_return_##n(struct pt_regs *ctx) { return on_probe(ctx, n, 1, 1); }    \
    int qt_blind_##n(struct pt_regs *ctx) { return on_probe(ctx, n, 0, 0); }

SLOT(0) SLOT(1) SLOT(2) SLOT(3) SLOT(4) SLOT(5) SLOT(6) SLOT(7)
SLOT(8) SLOT(9) SLOT(10) SLOT(11) SLOT(12) SLOT(13) SLOT(14) SLOT(15)
SLOT(16) SLOT(17) SLOT(18) SLOT(19) SLOT(20) SLOT(21) SLOT(22) SLOT(23)
SLOT(24) SLOT(25) SLOT(26) SLOT(27) SLOT(28) SLOT(29) SLOT(30) SLOT(31)
