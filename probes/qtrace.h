// SPDX-License-Identifier: Apache-2.0
// qtrace.h: the kernel/user contract, and nothing else.  probes/qtrace.bpf.c includes it;
// qtrace_bpf/contract/abi.py reads its #defines and enums (every enumerator carries its value), and
// takes the structs' layouts from BCC, which compiles this very file.  KVM ioctl numbers are
// not here: they come from <linux/kvm.h> (BPF side) and qtrace_bpf/contract/kvm_ioctl_numbers.py
// (generated from the same header by scripts/gen_kvm_ioctls.py).
#ifndef QTRACE_H
#define QTRACE_H

// Bumped on any change to a struct below: the layout of what the maps hold.
#define QTRACE_ABI_VERSION 6

// Lifecycle phase of a state write; names in user space are the lower-case suffix.
enum phase { PH_BOOT = 0, PH_RESET = 1, PH_HOTPLUG = 2, PH_MIGRATION = 3, PH_RUNTIME = 4 };

// What a catalog probe does (probes/catalog.toml `action`, lower-case suffix).
enum action {
    ACT_MARK = 0,             // count + event only
    ACT_RESET = 1,            // entry: open reset window, cause = arg1; return: close
    ACT_HOTPLUG = 2,          // entry: open hotplug window; return: close
    ACT_MIGRATION_BEGIN = 3,  // entry: open migration window (no uretprobe: coroutine)
    ACT_MIGRATION_END = 4,    // entry: close migration window
    ACT_BOOT_DONE = 5,        // return: boot is over
    ACT_PUT = 6,              // entry: this thread puts registers at level arg2; return: done
};

// Actions that also act at function return (a uretprobe, qt_return_N): the return branch of
// on_probe() handles exactly these, and user space places uretprobes for exactly these.
// Never for a function that may run in a coroutine (qemu_loadvm_state): a uretprobe there
// can kill QEMU.
#define RETURN_ACTIONS ((1 << ACT_RESET) | (1 << ACT_HOTPLUG) | (1 << ACT_BOOT_DONE) | (1 << ACT_PUT))
// The argument (x86-64 SysV: 1 = rdi, 2 = rsi) whose value the kernel itself uses; the
// catalog must give it that meaning (catalog.py checks).
#define RESET_CAUSE_ARG 1  // qemu_system_reset(ShutdownCause reason): "shutdown_cause"
#define PUT_LEVEL_ARG 2    // kvm_arch_put_registers(CPUState *, int level, ...): "level"

// struct event.kind.  K_STEP: a lifecycle step ended (id = enum step, arg1 = its duration
// in ns); the daemon reads durations from step_durations instead.
enum kind { K_LIFECYCLE = 1, K_STATE_WRITE = 2, K_EXEC = 3, K_EXIT = 4, K_STEP = 5 };
#define NKINDS 6

// Timed lifecycle steps (qtrace_lifecycle_duration_seconds{step}):
//   reset      qemu_system_reset entry -> the return of the last post-reset put (level 2)
//   hotplug    device_add entry -> the return of the new vCPU's first full put (level 3);
//              a device_add that puts no vCPU state (not a CPU) is not timed
//   migration  qemu_loadvm_state entry -> migration_incoming_state_destroy (incoming
//              migration, loadvm, libvirt restore)
enum step { S_RESET = 0, S_HOTPLUG = 1, S_MIGRATION = 2 };
#define NSTEPS 3
// Histogram bucket upper bounds in µs (le); bucket NDUR_BUCKETS is +Inf, and the key
// bucket DUR_SUM holds the sum of the durations in ns.
#define DUR_BUCKET_0_US 1000
#define DUR_BUCKET_1_US 2500
#define DUR_BUCKET_2_US 5000
#define DUR_BUCKET_3_US 10000
#define DUR_BUCKET_4_US 25000
#define DUR_BUCKET_5_US 50000
#define DUR_BUCKET_6_US 100000
#define DUR_BUCKET_7_US 250000
#define DUR_BUCKET_8_US 500000
#define DUR_BUCKET_9_US 1000000
#define DUR_BUCKET_10_US 2500000
#define DUR_BUCKET_11_US 5000000
#define DUR_BUCKET_12_US 10000000
#define NDUR_BUCKETS 13
#define DUR_SUM 0xffff

// Process-wide windows (struct proc_state.windows bits).  Hotplug nests (QMP device_add
// calls qdev_device_add, which calls qdev_device_add_from_qdict): a depth, not a bit.
#define W_RESET 1
#define W_MIGRATION 4

// Decoded values: index into vals[] and bit in have/known/changed.
#define V_APIC_BASE 0
#define V_TSC_KHZ 1
#define V_MSR_TSC 2
#define V_MSR_TSC_DEADLINE 3
#define NVALS 4

// QEMU's ShutdownCause (same values 7.2 -> 10.2); names are the suffix, '_' -> '-'.
#define CAUSE_NONE 0
#define CAUSE_HOST_ERROR 1
#define CAUSE_HOST_QMP_QUIT 2
#define CAUSE_HOST_QMP_SYSTEM_RESET 3
#define CAUSE_HOST_SIGNAL 4
#define CAUSE_HOST_UI 5
#define CAUSE_GUEST_SHUTDOWN 6
#define CAUSE_GUEST_RESET 7
#define CAUSE_GUEST_PANIC 8
#define CAUSE_SUBSYSTEM_RESET 9
#define CAUSE_SNAPSHOT_LOAD 10
#define CAUSE_UNKNOWN 11  // reset entered through a GCC clone: its registers are not read
#define NCAUSES 12

// A guest reset within FOLLOWUP_NS of a host-requested one is the firmware's own reboot
// (SeaBIOS answers a QMP system_reset with a hard reboot ~0.1 s later): also counted under
// reset_key.cause = cause | FOLLOWUP_FLAG, so alerts can subtract it.
#define FOLLOWUP_NS 2000000000ULL
#define FOLLOWUP_FLAG 0x100

#define MAX_SLOTS 32  // catalog probes: qt_entry_N / qt_return_N / qt_blind_N handlers
// arg1/arg2 of a lifecycle event from a qt_blind_N handler: an entry probe on a GCC clone
// (.isra/.constprop/.part) whose registers need not hold the function's arguments.
#define ARG_UNKNOWN 0xffffffffffffffffULL
// VM ids: the kernel numbers the VMs it sees exec from 1 up; user space numbers the ones
// it adopts later (a /proc rescan, watch) from USER_VM_ID_BASE up.  Keys use the id, never
// the pid, so a reused pid cannot mix a VM's counters with its predecessor's.
#define USER_VM_ID_BASE 0x80000000

struct proc_state {   // procs: tgid -> this
    u32 vm;
    u32 boot_done;
    u32 windows;
    u32 cause;
    u64 last_host_reset_ns;
    u32 hotplug_depth;    // hotplug functions running (nested)
    u32 pad;
    u64 step_start[NSTEPS];  // ktime the step began (0: not running)
    u64 step_end[NSTEPS];    // ktime its last (reset) or first (hotplug) put returned
};

struct probe_cfg {    // probe_cfg: catalog slot -> this
    u32 action;
    u32 pad;
};

struct vcpu_key {     // vcpu_fds: this -> vCPU id
    u32 vm;
    u32 fd;
};

struct val_key {      // last_val: this -> last value QEMU wrote; value_changes: -> count
    u32 vm;
    s32 vcpu;
    u32 which;        // V_*
};

struct count_key {    // write_counts
    u32 vm;
    s32 vcpu;         // -1: a VM-wide ioctl
    u32 cmd;          // the ioctl number
    u32 phase;
};

struct err_key {      // error_counts
    u32 vm;
    u32 cmd;
};

struct lc_key {       // lifecycle_counts
    u32 vm;
    u32 probe;        // catalog slot
};

struct step_key {     // step_durations: this -> observations in the bucket (or sum, ns)
    u32 vm;
    u32 step;         // S_*
    u32 bucket;       // 0..NDUR_BUCKETS, or DUR_SUM
};

struct reset_key {    // reset_counts
    u32 vm;
    u32 cause;        // CAUSE_*, | FOLLOWUP_FLAG
};

// Every map that BPF code inserts into; update_failed[M_x] counts the inserts into map x that
// failed (a full map), so a full map is never silent.  User-space names: the lower-case suffix.
enum map_id {
    M_PROCS = 0, M_VCPU_FDS = 1, M_LAST_VAL = 2, M_WRITE_COUNTS = 3, M_ERROR_COUNTS = 4,
    M_LIFECYCLE_COUNTS = 5, M_RESET_COUNTS = 6, M_INFLIGHT = 7, M_THREAD_LEVEL = 8,
    M_VALUE_CHANGES = 9, M_STEP_DURATIONS = 10,
};
#define NMAPS 11

struct event {
    u64 ts;
    u32 tgid;
    u32 tid;
    u32 vm;
    u32 kind;      // K_*
    u32 id;        // probe slot (lifecycle) or ioctl cmd (state write)
    s32 vcpu;
    u32 phase;
    u32 cause;
    u32 level;     // put level of the enclosing kvm_arch_put_registers (0: none)
    u32 fd;
    s64 ret;
    u64 arg1;
    u64 arg2;
    u32 have;      // V_* bits: vals[i] decoded
    u32 known;     // V_* bits: a previous value existed
    u32 changed;   // V_* bits: it differed
    u32 pad;
    u64 vals[NVALS];
};

#endif
