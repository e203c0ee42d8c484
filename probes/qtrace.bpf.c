// SPDX-License-Identifier: Apache-2.0
// qtrace: when, on which vCPU and in which lifecycle phase does QEMU write vCPU state
// into KVM?  Uprobes on QEMU lifecycle functions open/close phase windows; one kernel
// hook on KVM ioctls counts (and decodes) the state writes.  Counting happens here, in
// maps read by user space at its own pace; the ring buffer only carries (rare) events.
//
// The kernel hook is chosen at compile time: QTRACE_HOOK_FENTRY, QTRACE_HOOK_KPROBE or
// QTRACE_HOOK_TRACEPOINT (syscalls:sys_enter/exit_ioctl).  All three feed ioctl_enter()
// and ioctl_exit(), keyed by the syscall's fd so a vCPU is known by its fd, whichever
// thread issues the ioctl.

#include <uapi/linux/ptrace.h>

#define KVMIO 0xAE
#define KVM_CREATE_VM     0xae01
#define KVM_CREATE_VCPU   0xae41
#define KVM_SET_SREGS     0x4138ae84
#define KVM_SET_SREGS2    0x4140aecd
#define KVM_SET_MSRS      0x4008ae89
#define KVM_SET_TSC_KHZ   0xaea2

#define MSR_APIC_BASE     0x1b
#define MSR_TSC           0x10
#define MSR_TSC_DEADLINE  0x6e0
#define SREGS_APIC_BASE_OFF 272
#define MAX_MSRS 128

// Decoded values (index into vals[] and bit in have/known/changed).
#define V_APIC_BASE 0
#define V_TSC_KHZ 1
#define V_MSR_TSC 2
#define V_MSR_TSC_DEADLINE 3
#define NVALS 4

enum phase { PH_BOOT = 0, PH_RESET = 1, PH_HOTPLUG = 2, PH_MIGRATION = 3, PH_RUNTIME = 4 };

// What a catalog probe does (qtrace_bpf/catalog.py mirrors these numbers).
enum action {
    ACT_MARK = 0,             // count + event only
    ACT_RESET = 1,            // entry: open reset window, cause = arg1; return: close
    ACT_HOTPLUG = 2,          // entry: open hotplug window; return: close
    ACT_MIGRATION_BEGIN = 3,  // entry: open migration window (no uretprobe: coroutine)
    ACT_MIGRATION_END = 4,    // entry: close migration window
    ACT_BOOT_DONE = 5,        // return: boot is over
    ACT_PUT = 6,              // entry: this thread puts registers at level arg2; return: done
};

#define W_RESET 1
#define W_HOTPLUG 2
#define W_MIGRATION 4

#define K_LIFECYCLE 1
#define K_STATE_WRITE 2
#define K_EXEC 3      // a QEMU process started (daemon discovery)
#define K_EXIT 4      // a tracked QEMU process ended

// ShutdownCause values that mean "the host asked for this reset"; a guest-reset that
// follows one within FOLLOWUP_NS is the firmware's own reboot (SeaBIOS answers a QMP
// system_reset with a hard reboot ~0.1 s later), counted apart so alerts can ignore it.
#define CAUSE_HOST_ERROR 1
#define CAUSE_HOST_QMP_SYSTEM_RESET 3
#define CAUSE_HOST_UI 5
#define CAUSE_GUEST_RESET 7
#define FOLLOWUP_NS 2000000000ULL
#define FOLLOWUP_FLAG 0x100   // reset_counts key: cause | FOLLOWUP_FLAG

struct proc_state {
    u32 boot_done;
    u32 windows;
    u32 cause;
    u32 pad;
    u64 last_host_reset_ns;
};

struct probe_cfg {
    u32 action;
    u32 pad;
};

struct fd_key {
    u32 tgid;
    u32 fd;
};

struct inflight {
    u64 arg;
    u32 fd;
    u32 cmd;
    s32 vcpu;
    u32 phase;
    u32 cause;
    u32 level;
    u32 have;
    u32 pad;
    u64 vals[NVALS];
};

struct val_key {
    u32 tgid;
    s32 vcpu;
    u32 which;
};

struct count_key {
    u32 tgid;
    s32 vcpu;
    u32 cmd;
    u32 phase;
};

struct err_key {
    u32 tgid;
    u32 cmd;
};

struct lc_key {
    u32 tgid;
    u32 probe;
};

struct reset_key {
    u32 tgid;
    u32 cause;
};

struct event {
    u64 ts;
    u32 tgid;
    u32 tid;
    u32 kind;
    u32 id;        // probe id (lifecycle) or ioctl cmd (state write)
    s32 vcpu;
    u32 phase;
    u32 cause;
    u32 level;
    s64 ret;
    u64 arg1;
    u64 arg2;
    u32 fd;
    u32 have;
    u32 known;
    u32 changed;
    u64 vals[NVALS];
};

// Tracked QEMU processes (the BPF-side pid filter) and their phase windows.
BPF_HASH(procs, u32, struct proc_state, 4096);
BPF_ARRAY(probe_cfg, struct probe_cfg, 64);
BPF_HASH(watched, u32, u32, 256);                    // ioctl cmd -> 1: state writes
BPF_HASH(thread_level, u32, u32, 16384);             // tid -> put level in progress
BPF_HASH(vcpu_fds, struct fd_key, s32, 16384);       // vCPU fd -> vCPU id
BPF_HASH(inflight, u32, struct inflight, 16384);     // tid -> watched ioctl in progress
BPF_HASH(last_val, struct val_key, u64, 65536);      // last value QEMU wrote per vCPU
BPF_HASH(write_counts, struct count_key, u64, 65536);
BPF_HASH(error_counts, struct err_key, u64, 16384);
BPF_HASH(lifecycle_counts, struct lc_key, u64, 16384);
BPF_HASH(reset_counts, struct reset_key, u64, 16384);
BPF_ARRAY(stats, u64, 4);                            // [0] ring buffer events lost
BPF_RINGBUF_OUTPUT(events, 64);

static __always_inline void lost_event(void) {
    u32 zero = 0;
    u64 *lost = stats.lookup(&zero);
    if (lost)
        __sync_fetch_and_add(lost, 1);
}

static __always_inline u32 phase_of(struct proc_state *ps, u32 *cause) {
    *cause = 0;
    if (!ps->boot_done)
        return PH_BOOT;
    if (ps->windows & W_MIGRATION)
        return PH_MIGRATION;
    if (ps->windows & W_RESET) {
        *cause = ps->cause;
        return PH_RESET;
    }
    if (ps->windows & W_HOTPLUG)
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
        struct { u32 index; u32 reserved; u64 data; } entry = {};  // struct kvm_msr_entry
        bpf_probe_read_user(&entry, sizeof(entry), (u8 *)in->arg + 8 + i * 16);
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

// A zeroed event with its header filled, or NULL (counted as lost) when the ring is full.
static __always_inline struct event *new_event(u32 kind, u32 tgid, u32 tid) {
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        lost_event();
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ts = bpf_ktime_get_ns();
    e->tgid = tgid;
    e->tid = tid;
    e->kind = kind;
    e->vcpu = -1;
    return e;
}

static __always_inline void emit_simple(u32 kind, u32 tgid, u32 tid) {
    struct event *e = new_event(kind, tgid, tid);
    if (e)
        events.ringbuf_submit(e, 0);
}

static __always_inline int ioctl_enter(u32 fd, u32 cmd, u64 arg) {
    if (((cmd >> 8) & 0xff) != KVMIO)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    struct proc_state *ps = procs.lookup(&tgid);
#ifdef QTRACE_DISCOVERY
    if (!ps && cmd == KVM_CREATE_VM) {
        // A VMM that exec discovery did not recognise: track it from its first VM.
        struct proc_state st = {};
        procs.update(&tgid, &st);
        emit_simple(K_EXEC, tgid, tid);
        return 0;
    }
#endif
    if (!ps)
        return 0;
    if (!watched.lookup(&cmd))
        return 0;

    struct inflight in = {};
    in.arg = arg;
    in.fd = fd;
    in.cmd = cmd;
    struct fd_key fk = {.tgid = tgid, .fd = fd};
    s32 *vcpu = vcpu_fds.lookup(&fk);
    in.vcpu = vcpu ? *vcpu : -1;
    in.phase = phase_of(ps, &in.cause);
    u32 *level = thread_level.lookup(&tid);
    in.level = level ? *level : 0;

    if (cmd == KVM_SET_SREGS || cmd == KVM_SET_SREGS2) {
        bpf_probe_read_user(&in.vals[V_APIC_BASE], 8, (void *)(arg + SREGS_APIC_BASE_OFF));
        in.have |= 1 << V_APIC_BASE;
    } else if (cmd == KVM_SET_TSC_KHZ) {
        in.vals[V_TSC_KHZ] = arg;
        in.have |= 1 << V_TSC_KHZ;
    } else if (cmd == KVM_SET_MSRS) {
        decode_msrs(&in);
    }
    inflight.update(&tid, &in);
    return 0;
}

static __always_inline int ioctl_exit(s64 ret) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    struct inflight *p = inflight.lookup(&tid);
    if (!p)
        return 0;
    struct inflight in = *p;
    inflight.delete(&tid);

    u32 known = 0, changed = 0;
    if (ret < 0) {
        struct err_key ek = {.tgid = tgid, .cmd = in.cmd};
        error_counts.atomic_increment(ek);
    } else {
        if (in.cmd == KVM_CREATE_VCPU) {
            struct fd_key fk = {.tgid = tgid, .fd = (u32)ret};
            s32 id = (s32)in.arg;
            vcpu_fds.update(&fk, &id);
            in.vcpu = id;
        }
        struct count_key ck = {.tgid = tgid, .vcpu = in.vcpu, .cmd = in.cmd, .phase = in.phase};
        write_counts.atomic_increment(ck);
        for (int i = 0; i < NVALS; i++) {
            if (!(in.have & (1 << i)))
                continue;
            struct val_key vk = {.tgid = tgid, .vcpu = in.vcpu, .which = i};
            u64 *prev = last_val.lookup(&vk);
            if (prev) {
                known |= 1 << i;
                if (*prev != in.vals[i])
                    changed |= 1 << i;
            }
            last_val.update(&vk, &in.vals[i]);
        }
    }

    struct event *e = new_event(K_STATE_WRITE, tgid, tid);
    if (!e)
        return 0;
    e->id = in.cmd;
    e->vcpu = in.vcpu;
    e->phase = in.phase;
    e->cause = in.cause;
    e->level = in.level;
    e->ret = ret;
    e->arg1 = in.arg;
    e->fd = in.fd;
    e->have = in.have;
    e->known = known;
    e->changed = changed;
    for (int i = 0; i < NVALS; i++)
        e->vals[i] = in.vals[i];
    events.ringbuf_submit(e, 0);
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
KFUNC_PROBE(kvm_vcpu_ioctl, void *filp, unsigned int ioctl, unsigned long arg) {
    return ioctl_enter(syscall_fd(), ioctl, arg);
}
KRETFUNC_PROBE(kvm_vcpu_ioctl, void *filp, unsigned int ioctl, unsigned long arg, long ret) {
    return ioctl_exit(ret);
}
KFUNC_PROBE(kvm_vm_ioctl, void *filp, unsigned int ioctl, unsigned long arg) {
    return ioctl_enter(syscall_fd(), ioctl, arg);
}
KRETFUNC_PROBE(kvm_vm_ioctl, void *filp, unsigned int ioctl, unsigned long arg, long ret) {
    return ioctl_exit(ret);
}
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

static __always_inline void emit_lifecycle(u32 tgid, u32 tid, u32 id, struct proc_state *ps,
                                           u64 arg1, u64 arg2, u32 level) {
    struct event *e = new_event(K_LIFECYCLE, tgid, tid);
    if (!e)
        return;
    e->id = id;
    e->phase = phase_of(ps, &e->cause);
    e->level = level;
    e->arg1 = arg1;
    e->arg2 = arg2;
    events.ringbuf_submit(e, 0);
}

static __always_inline int on_probe(struct pt_regs *ctx, u32 id, int is_return) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    struct proc_state *ps = procs.lookup(&tgid);
    if (!ps)
        return 0;
    struct probe_cfg *cfg = probe_cfg.lookup(&id);
    if (!cfg)
        return 0;
    u32 action = cfg->action;

    if (is_return) {
        if (action == ACT_RESET)
            ps->windows &= ~W_RESET;
        else if (action == ACT_HOTPLUG)
            ps->windows &= ~W_HOTPLUG;
        else if (action == ACT_BOOT_DONE)
            ps->boot_done = 1;
        else if (action == ACT_PUT)
            thread_level.delete(&tid);
        return 0;
    }

    u64 arg1 = PT_REGS_PARM1(ctx), arg2 = PT_REGS_PARM2(ctx);
    u32 level = 0;
    if (action == ACT_RESET) {
        u32 cause = (u32)arg1;
        ps->cause = cause;
        ps->windows |= W_RESET;
        if (ps->boot_done) {
            // Boot-time reset (cause none) is part of boot; QMP emits no RESET for it.
            u64 now = bpf_ktime_get_ns();
            struct reset_key rk = {.tgid = tgid, .cause = cause};
            reset_counts.atomic_increment(rk);
            if (cause == CAUSE_HOST_QMP_SYSTEM_RESET || cause == CAUSE_HOST_UI ||
                cause == CAUSE_HOST_ERROR) {
                ps->last_host_reset_ns = now;
            } else if (cause == CAUSE_GUEST_RESET && ps->last_host_reset_ns &&
                       now - ps->last_host_reset_ns < FOLLOWUP_NS) {
                struct reset_key fk = {.tgid = tgid, .cause = cause | FOLLOWUP_FLAG};
                reset_counts.atomic_increment(fk);
                ps->last_host_reset_ns = 0;
            }
        }
    } else if (action == ACT_HOTPLUG) {
        ps->windows |= W_HOTPLUG;
    } else if (action == ACT_MIGRATION_BEGIN) {
        ps->windows |= W_MIGRATION;
    } else if (action == ACT_MIGRATION_END) {
        ps->windows &= ~W_MIGRATION;
    } else if (action == ACT_PUT) {
        level = (u32)arg2;
        thread_level.update(&tid, &level);
    }

    struct lc_key lk = {.tgid = tgid, .probe = id};
    lifecycle_counts.atomic_increment(lk);
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
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct proc_state st = {};
    procs.update(&tgid, &st);
    emit_simple(K_EXEC, tgid, (u32)pid_tgid);
    return 0;
}

int tp_sched_exit(void *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if ((u32)pid_tgid != tgid)
        return 0;  // a thread, not the process
    if (!procs.lookup(&tgid))
        return 0;
    procs.delete(&tgid);
    emit_simple(K_EXIT, tgid, tgid);
    return 0;
}
#endif

// One entry and one return handler per catalog slot; the slot's action is data.
#define SLOT(n)                                                                   \
    int qt_entry_##n(struct pt_regs *ctx) { return on_probe(ctx, n, 0); }        \
    int qt_return_##n(struct pt_regs *ctx) { return on_probe(ctx, n, 1); }

SLOT(0) SLOT(1) SLOT(2) SLOT(3) SLOT(4) SLOT(5) SLOT(6) SLOT(7)
SLOT(8) SLOT(9) SLOT(10) SLOT(11) SLOT(12) SLOT(13) SLOT(14) SLOT(15)
SLOT(16) SLOT(17) SLOT(18) SLOT(19) SLOT(20) SLOT(21) SLOT(22) SLOT(23)
SLOT(24) SLOT(25) SLOT(26) SLOT(27) SLOT(28) SLOT(29) SLOT(30) SLOT(31)
