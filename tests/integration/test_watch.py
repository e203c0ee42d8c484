"""qprobe watch on real QEMU/KVM VMs, cross-checked against strace and QMP's own events."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter, defaultdict

import pytest
from support.caps import check_kvm, require
from support.kernel_state import added, bpf_state, wait_settled
from support.qemu import call_ioctl_inside, dtrace_qemu, host_tsc_khz, vcpu_fd
from support.qprobe import Watcher
from support.strace_count import count_state_writes, strace_argv, strace_times

from qtrace_bpf.commands.demo_vm import DemoQemu

pytestmark = [pytest.mark.bpf, pytest.mark.kvm]


def writes(events: list[dict], **match: object) -> list[dict]:
    return [e for e in events if e["kind"] == "state_write"
            and all(e.get(k) == v for k, v in match.items())]


def phases_of(events: list[dict], vcpu: int, ioctl: str) -> set[str]:
    return {e["phase"] for e in writes(events, vcpu=vcpu, event=ioctl)}


# The lifecycle events that open each step (the first one, when they nest).
OPENS = {"reset": ("system_reset",), "hotplug": ("device_add", "device_add_qmp"),
         "migration": ("migration_load",)}


def steps_with_spans(events: list[dict], trace: str) -> list[tuple[dict, float, int]]:
    """Each `step` event, with strace's span (last minus first entry time) of the writes
    that belong to it and their number: the writes of its phase since the last step of
    that phase.  strace's clock and log, not qtrace's, measure the span.  Also checks the
    step against qtrace's own event times: it lasts at least from its opening function's
    entry to its last write's return (the end is the last put's return, not the first)."""
    times = iter(strace_times(events, trace))
    pending: dict[str, list[float]] = defaultdict(list)
    opened: dict[str, float] = {}
    last_write: dict[str, float] = {}
    out = []
    for e in events:
        if e["kind"] == "lifecycle":
            for step, names in OPENS.items():
                if e["event"] in names and e["phase"] == step and step not in opened:
                    opened[step] = e["ts"]
        elif e["kind"] == "state_write":
            pending[e["phase"]].append(next(times))
            last_write[e["phase"]] = e["ts"]
        elif e["kind"] == "step":
            ts = pending.pop(e["phase"], [])
            start, last = opened.pop(e["step"]), last_write.pop(e["phase"], None)
            if last is not None:  # event times are rounded to 1 us
                assert e["seconds"] >= last - start - 2e-6, (e, start, last)
            out.append((e, max(ts) - min(ts) if ts else 0.0, len(ts)))
    return out


def assert_no_unexpected(events: list[dict]) -> None:
    """Every write in its expected phase: the summary and the event stream agree."""
    assert events[-1]["kind"] == "summary" and events[-1]["unexpected"] == {}, events[-1]
    assert not [e for e in events if e.get("unexpected")]


def qmp_resets(vm: DemoQemu) -> Counter:
    return Counter(e["data"]["reason"] for e in vm.collect_events() if e["event"] == "RESET")


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory, qemu):
    """One VM's whole life, traced by qprobe and, independently, by strace: boot, a vCPU
    hot-added over QMP (vCPU 1) and one over HMP (vCPU 2), a runtime put, a QMP reset."""
    check_kvm()
    tmp = tmp_path_factory.mktemp("strace")
    trace = str(tmp / "strace.out")
    before = bpf_state()
    vm = DemoQemu("lifecycle-e2e", preconfig=True, smp="1,maxcpus=4", qemu=qemu)
    try:
        watcher = Watcher(vm.pid)
        during = added(before, bpf_state())
        strace = subprocess.Popen([*strace_argv(trace), "-p", str(vm.pid)],
                                  stderr=subprocess.PIPE, text=True)
        # strace says "Process N attached with M threads" once it has seized them all.
        assert strace.stderr is not None
        line = strace.stderr.readline()
        assert "attached" in line, f"strace did not attach: {line!r}"
        vm.cmd("x-exit-preconfig")
        vm.cmd("cont")
        time.sleep(0.5)
        vm.hotplug_cpu()
        time.sleep(0.5)
        vm.hotplug_cpu(hmp=True)
        time.sleep(0.5)
        # reading the registers makes the vCPU dirty: QEMU puts them back at level 1
        vm.cmd("human-monitor-command", **{"command-line": "info registers"})
        time.sleep(0.3)
        vm.cmd("system_reset")
        time.sleep(1.5)  # SeaBIOS answers with its own hard reboot (guest-reset)
        resets = qmp_resets(vm)
        vm.quit()
        strace.wait(30)
        rc, events = watcher.wait()
        yield {"rc": rc, "events": events[:-1], "summary": events[-1], "resets": resets,
               "strace": count_state_writes(trace), "trace": trace, "all": events,
               "watcher": watcher, "during": during, "after": wait_settled(before)}
    finally:
        vm.close()


def test_exit_and_summary(lifecycle_run):
    assert lifecycle_run["rc"] == 0, lifecycle_run["watcher"].stderr
    s = lifecycle_run["summary"]
    assert s["kind"] == "summary" and s["stopped_by"] == "target exit"
    assert s["kernel_hook"] in ("fentry", "kprobe", "tracepoint")
    assert s["events_lost"] == 0


def test_json_contract_fields(lifecycle_run):
    for ev in lifecycle_run["events"]:
        for key in ("ts", "vm", "pid", "tid", "vcpu", "kind", "event", "phase"):
            assert key in ev, (key, ev)
        assert ev["vm"] == "lifecycle-e2e"
        assert ev["kind"] in ("lifecycle", "state_write", "step")
        assert ev["phase"] in ("boot", "reset", "hotplug", "migration", "runtime")


def test_counts_equal_strace(lifecycle_run):
    """Every successful state write QEMU made, per vCPU and ioctl, equals strace's count."""
    ours: Counter = Counter()
    for row in lifecycle_run["summary"]["writes"]:
        ours[(row["vcpu"], row["ioctl"])] += row["count"]
    assert lifecycle_run["strace"], "strace saw nothing"
    assert ours == lifecycle_run["strace"]
    # and the event stream carries the same writes as the in-kernel counters
    stream = Counter((e["vcpu"], e["event"]) for e in writes(lifecycle_run["events"])
                     if not e.get("error"))
    assert stream == ours


def test_no_unexpected_writes_in_boot_hotplug_reset(lifecycle_run):
    assert_no_unexpected(lifecycle_run["all"])


def test_step_durations_cover_their_writes(lifecycle_run):
    """One step per hotplug (QMP, HMP) and per reset QMP reported; each lasts at least as
    long as its writes took in strace's timestamps, and under a second."""
    steps = steps_with_spans(lifecycle_run["events"], lifecycle_run["trace"])
    assert Counter(e["step"] for e, _, _ in steps) == {
        "hotplug": 2, "reset": sum(lifecycle_run["resets"].values())}, steps
    for e, span, n in steps:
        assert n > 0 and span <= e["seconds"] < 1.0, (e, span, n)
    assert lifecycle_run["summary"]["steps"] == [
        {"step": e["step"], "seconds": e["seconds"]} for e, _, _ in steps]


def test_boot_phase_in_full(lifecycle_run):
    ev = lifecycle_run["events"]
    for ioctl in ("KVM_CREATE_VCPU", "KVM_SET_CPUID2", "KVM_SET_SREGS2", "KVM_SET_TSC_KHZ",
                  "KVM_SET_LAPIC"):
        assert "boot" in phases_of(ev, 0, ioctl), ioctl
    boot_reset = [e for e in ev if e["kind"] == "lifecycle" and e["event"] == "system_reset"
                  and e["phase"] == "boot"]
    assert [e["cause"] for e in boot_reset] == ["none"]


def test_hotplug_phase(lifecycle_run):
    ev = lifecycle_run["events"]
    # QMP device_add runs qdev_device_add around qdev_device_add_from_qdict in 7.2; from
    # QEMU 9.2 on only the latter (HMP still goes through both): both are probed, their
    # windows nest
    assert {"device_add", "device_add_qmp"} <= {e["event"] for e in ev
                                                 if e["kind"] == "lifecycle"}
    for vcpu in (1, 2):  # QMP, HMP
        for ioctl in ("KVM_CREATE_VCPU", "KVM_SET_LAPIC", "KVM_SET_SREGS2", "KVM_SET_TSC_KHZ"):
            assert phases_of(ev, vcpu, ioctl) >= {"hotplug"}, (vcpu, ioctl)
        before_reset = [e for e in writes(ev, vcpu=vcpu) if e["phase"] != "reset"]
        assert {e["phase"] for e in before_reset} == {"hotplug"}, vcpu
    assert not [e for e in writes(ev, vcpu=0) if e["phase"] == "hotplug"]


def test_reset_phase_and_cause(lifecycle_run):
    ev = lifecycle_run["events"]
    for vcpu in (0, 1, 2):
        causes = {e.get("cause") for e in writes(ev, vcpu=vcpu, event="KVM_SET_LAPIC")
                  if e["phase"] == "reset"}
        assert "host-qmp-system-reset" in causes, vcpu


def test_reset_counts_equal_qmp(lifecycle_run):
    assert lifecycle_run["resets"]["host-qmp-system-reset"] == 1
    assert lifecycle_run["summary"]["resets"] == dict(lifecycle_run["resets"])


def test_apic_base_after_reset(lifecycle_run):
    ev = lifecycle_run["events"]
    for vcpu, expected in ((0, "0xfee00900"), (1, "0xfee00800"), (2, "0xfee00800")):
        sregs = [e for e in writes(ev, vcpu=vcpu, event="KVM_SET_SREGS2")
                 if e["phase"] == "reset"]
        assert sregs and {e["apic_base"] for e in sregs} == {expected}, (vcpu, sregs)
        assert all(e["apic_base_changed"] is False for e in sregs)
    msrs = [e for e in writes(ev, vcpu=1, event="KVM_SET_MSRS") if "apic_base" in e]
    assert msrs and msrs[0]["apic_base"] == "0xfee00800"


def test_per_vcpu_phase_matrix(lifecycle_run):
    """The facts table's writes, by vCPU and phase, for this exact sequence."""
    seen = defaultdict(set)
    for e in writes(lifecycle_run["events"]):
        if e["event"] in ("KVM_SET_LAPIC", "KVM_SET_SREGS2", "KVM_SET_TSC_KHZ", "KVM_CREATE_VCPU"):
            seen[(e["vcpu"], e["phase"])].add(e["event"])
    assert seen[(0, "boot")] == {"KVM_CREATE_VCPU", "KVM_SET_SREGS2", "KVM_SET_TSC_KHZ",
                                 "KVM_SET_LAPIC"}
    for vcpu in (1, 2):
        assert seen[(vcpu, "hotplug")] == {"KVM_CREATE_VCPU", "KVM_SET_LAPIC",
                                           "KVM_SET_SREGS2", "KVM_SET_TSC_KHZ"}
    for vcpu in (0, 1, 2):
        assert seen[(vcpu, "reset")] == {"KVM_SET_LAPIC", "KVM_SET_SREGS2"}


def test_put_levels_by_phase(lifecycle_run):
    """The level of the enclosing kvm_arch_put_registers: 3 (full) at post-init and hotplug,
    2 at reset, 1 at runtime (after the registers were read)."""
    ev = lifecycle_run["events"]
    levels = defaultdict(set)
    for e in writes(ev, event="KVM_SET_REGS"):
        levels[(e["vcpu"], e["phase"])].add(e.get("level"))
    assert levels[(0, "boot")] == {3, 2}, levels  # post_init, then the boot-time reset
    assert levels[(1, "hotplug")] == levels[(2, "hotplug")] == {3}, levels
    assert levels[(0, "reset")] == levels[(1, "reset")] == levels[(2, "reset")] == {2}, levels
    assert levels[(0, "runtime")] == {1}, levels
    assert {e.get("level") for e in writes(ev, event="KVM_SET_TSC_KHZ")
            if e["phase"] != "boot" or e["vcpu"] == 0} <= {3, None}


def test_nothing_left_after_target_exit(lifecycle_run):
    """While tracing, programs, maps and perf attachments of ours exist; after, none."""
    assert {"progs", "maps", "links"} <= set(lifecycle_run["during"]), lifecycle_run["during"]
    assert "pins" not in lifecycle_run["during"], "watch pins nothing"
    assert lifecycle_run["after"] == {}


def test_tsc_frequency_decoded(qemu):
    """With -cpu ...,tsc-frequency=F QEMU sets it at vCPU init too; both decode to F."""
    khz = host_tsc_khz()  # no TSC scaling in nested KVM: ask for what the host has
    with DemoQemu("tsc", preconfig=True, cpu=f"qemu64,tsc-frequency={khz * 1000}", qemu=qemu) as vm:
        w = Watcher(vm.pid)
        vm.cmd("x-exit-preconfig")
        time.sleep(0.3)
        vm.quit()
        rc, events = w.wait()
    assert rc == 0, w.stderr
    tsc = writes(events, vcpu=0, event="KVM_SET_TSC_KHZ")
    # kvm_arch_init_vcpu (explicit frequency) + the level-3 put at post_init
    assert [e["tsc_khz"] for e in tsc] == [khz, khz]
    assert [e["tsc_khz_changed"] for e in tsc] == [None, False]
    assert all(e["phase"] == "boot" for e in tsc)


def test_guest_initiated_reset(qemu):
    """SeaBIOS with nothing to boot reboots itself: cause guest-reset, as QMP says."""
    with DemoQemu("rebooter", extra=["-boot", "reboot-timeout=500"], qemu=qemu) as vm:
        w = Watcher(vm.pid)
        vm.cmd("cont")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and qmp_resets(vm)["guest-reset"] < 2:
            time.sleep(0.2)
        vm.cmd("stop")
        time.sleep(0.2)
        resets = qmp_resets(vm)
        vm.quit()
        rc, events = w.wait()
    assert rc == 0, w.stderr
    assert resets["guest-reset"] >= 2
    assert events[-1]["resets"] == dict(resets)
    assert_no_unexpected(events)
    guest = [e for e in writes(events[:-1], event="KVM_SET_LAPIC") if e["phase"] == "reset"]
    assert guest and {e["cause"] for e in guest} == {"guest-reset"}
    assert {e["apic_base"] for e in writes(events[:-1], event="KVM_SET_SREGS2")
            if e["phase"] == "reset"} == {"0xfee00900"}


def test_watch_by_name_filters_and_marks_unexpected(kvm_caps, tmp_path):
    """`watch --vm NAME --ioctl set_tsc_khz` prints only that ioctl's writes: the hot-added
    vCPU's (expected) and one made from inside QEMU at runtime (marked unexpected); the
    summary still counts every write."""
    with DemoQemu("tsc-watch", paused=False) as vm:
        time.sleep(0.3)
        w = Watcher(None, "--vm", "tsc-watch", "--ioctl", "set_tsc_khz")
        assert f"pid {vm.pid}" in w.attached_line and "showing only ioctl" in w.attached_line
        vm.cmd("stop")
        assert call_ioctl_inside(vm.pid, vcpu_fd(vm.pid), 0xAEA2, host_tsc_khz(), tmp_path) == 0
        vm.cmd("cont")
        vm.hotplug_cpu()
        time.sleep(0.3)
        vm.quit()
        rc, events = w.wait()
    assert rc == 0, w.stderr
    ev, summary = events[:-1], events[-1]
    assert ev and {(e["kind"], e["event"]) for e in ev} == {("state_write", "KVM_SET_TSC_KHZ")}
    odd = [(e["vcpu"], e["phase"]) for e in ev if e.get("unexpected")]
    assert odd == [(0, "runtime")], ev
    assert {e["phase"] for e in ev if e["vcpu"] == 1} == {"hotplug"}
    assert summary["unexpected"] == {"KVM_SET_TSC_KHZ": 1}
    assert {r["ioctl"] for r in summary["writes"]} > {"KVM_SET_TSC_KHZ", "KVM_SET_LAPIC"}


def usdt_semaphore(pid: int, exe: str, name: str) -> int:
    """The value of a USDT probe's semaphore in the running process (the kernel counts it
    up while a uprobe with that ref_ctr_offset is attached)."""
    import os

    from qtrace_bpf.symbols import elf as elfio

    e, stream = elfio.open_elf(exe, exe)
    with stream:
        note = next(n for n in elfio.usdt_notes(e) if n.full_name == name)
    real = os.path.realpath(exe)
    with open(f"/proc/{pid}/maps") as f:
        base = next(int(ln.split("-")[0], 16) for ln in f
                    if ln.rstrip().endswith(real) and ln.split()[2] == "00000000")
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(base + note.semaphore)
        return int.from_bytes(mem.read(2), "little")


@pytest.mark.parametrize("usdt,uprobes", [("on", "multi"), ("on", "perf"), ("off", "multi")])
def test_usdt_and_function_uprobes_give_the_same_events(kvm_caps, monkeypatch, usdt, uprobes):
    """On a QEMU built with dtrace (scripts/build-qemu.sh --dtrace), vcpu_init and
    vcpu_create come from its static probes (semaphores counted up while attached, back to
    0 after) or, with QTRACE_USDT=off, from uprobes on the functions: the same events."""
    qemu = dtrace_qemu()
    require("upstream QEMU built with dtrace", qemu is not None,
            "bash scripts/build-qemu.sh --dtrace (~3 min)")
    monkeypatch.setenv("QTRACE_USDT", usdt)
    monkeypatch.setenv("QTRACE_UPROBES", uprobes)
    with DemoQemu(f"usdt-{usdt}", preconfig=True, smp="1,maxcpus=2", qemu=qemu) as vm:
        w = Watcher(vm.pid)
        vm.cmd("x-exit-preconfig")
        vm.cmd("cont")
        vm.hotplug_cpu()
        time.sleep(0.3)
        sem = usdt_semaphore(vm.pid, qemu, "qemu:kvm_init_vcpu")
        w.proc.send_signal(signal.SIGTERM)
        rc, events = w.wait()
        after = usdt_semaphore(vm.pid, qemu, "qemu:kvm_init_vcpu")
        vm.quit()
    assert rc == 0, w.stderr
    assert (sem, after) == ((1, 0) if usdt == "on" else (0, 0))
    seen = [(e["event"], e["function"]) for e in events
            if e["kind"] == "lifecycle" and e["event"] in ("vcpu_init", "vcpu_create")]
    assert Counter(ev for ev, _ in seen) == {"vcpu_init": 2, "vcpu_create": 2}, seen
    want = {"usdt qemu:kvm_init_vcpu", "usdt qemu:kvm_create_vcpu"} if usdt == "on" \
        else {"kvm_init_vcpu", "kvm_create_vcpu"}
    assert {fn for _, fn in seen} == want


def test_symbols_reports_the_usdt_source(kvm_caps):
    qemu = dtrace_qemu()
    require("upstream QEMU built with dtrace", qemu is not None,
            "bash scripts/build-qemu.sh --dtrace (~3 min)")
    import json

    from support import QPROBE, ROOT

    out = subprocess.run([*QPROBE, "symbols", qemu, "--json"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    rows = {r["event"]: r for r in json.loads(out)["events"]}
    assert rows["vcpu_init"]["source"] == "usdt" and rows["vcpu_init"]["semaphore"]
    assert rows["vcpu_init"]["symbol"].startswith("qemu:kvm_init_vcpu")
    assert rows["put_registers"]["source"] == ".symtab"  # no trace point covers it


def attach_strace(pid: int, trace: str) -> subprocess.Popen:
    """strace -p, returned once it has seized every thread (its "attached" line)."""
    strace = subprocess.Popen([*strace_argv(trace), "-p", str(pid)],
                              stderr=subprocess.PIPE, text=True)
    assert strace.stderr is not None
    line = strace.stderr.readline()
    assert "attached" in line, f"strace did not attach: {line!r}"
    return strace


def save_state(qemu: str | None, path, cpu: str | None = None) -> None:
    """Migrate a short-lived VM to a file: the stream an incoming migration loads."""
    with DemoQemu("mig-src", qemu=qemu, cpu=cpu) as src:
        src.cmd("cont")
        time.sleep(0.5)
        src.cmd("stop")
        src.cmd("migrate", uri=f"exec:cat > {path}")
        deadline = time.monotonic() + 30
        while src.cmd("query-migrate").get("status") != "completed":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "migration to file did not complete"
            time.sleep(0.1)
        src.quit()
    assert path.stat().st_size > 0


def wait_migration(vm: DemoQemu, status: str) -> None:
    deadline = time.monotonic() + 30
    while (got := vm.cmd("query-migrate").get("status")) != status:  # type: ignore[union-attr]
        assert got != "failed" or status == "failed", "incoming migration failed"
        assert time.monotonic() < deadline, f"incoming migration not {status}: {got}"
        time.sleep(0.1)


def test_incoming_migration_phase(qemu, tmp_path):
    """A migration target with an explicit TSC frequency, traced from before machine
    creation: writes while the stream loads are phase migration (a full put, the TSC
    frequency again); boot before it, reset after it; every count equals strace's."""
    khz = host_tsc_khz()
    cpu = f"qemu64,tsc-frequency={khz * 1000}"
    state = tmp_path / "vm.state"
    save_state(qemu, state, cpu)
    trace = str(tmp_path / "strace.out")
    with DemoQemu("mig-dst", preconfig=True, cpu=cpu, extra=["-incoming", "defer"],
                  qemu=qemu) as dst:
        w = Watcher(dst.pid)
        strace = attach_strace(dst.pid, trace)
        dst.cmd("x-exit-preconfig")
        dst.cmd("migrate-incoming", uri=f"exec:cat {state}")
        wait_migration(dst, "completed")
        time.sleep(0.3)
        dst.cmd("system_reset")  # after the migration window: phase reset again
        time.sleep(0.3)
        assert dst.proc.poll() is None, "QEMU died during incoming migration"
        resets = qmp_resets(dst)
        dst.quit()
        strace.wait(30)
        rc, events = w.wait()
    assert rc == 0, w.stderr
    ev, summary = events[:-1], events[-1]
    lifecycle = [e["event"] for e in ev if e["kind"] == "lifecycle"]
    assert lifecycle.index("machine_done") < lifecycle.index("migration_load") \
        < lifecycle.index("migration_done")
    assert "boot" in phases_of(ev, 0, "KVM_CREATE_VCPU")
    assert {"KVM_SET_LAPIC", "KVM_SET_SREGS2", "KVM_SET_TSC_KHZ"} <= {
        e["event"] for e in writes(ev, vcpu=0) if e["phase"] == "migration"}
    assert {e["tsc_khz"] for e in writes(ev, vcpu=0, event="KVM_SET_TSC_KHZ")
            if e["phase"] == "migration"} == {khz}
    # the loaded state is put back in full
    assert {e.get("level") for e in writes(ev, vcpu=0, event="KVM_SET_REGS")
            if e["phase"] == "migration"} == {3}
    after = [e for e in writes(ev, vcpu=0, event="KVM_SET_LAPIC") if e["phase"] == "reset"]
    assert after and {e["cause"] for e in after} == {"host-qmp-system-reset"}
    assert summary["resets"] == dict(resets)
    ours: Counter = Counter()
    for row in summary["writes"]:
        ours[(row["vcpu"], row["ioctl"])] += row["count"]
    assert ours == count_state_writes(trace)
    assert_no_unexpected(events)
    steps = steps_with_spans(ev, trace)
    assert [e["step"] for e, _, _ in steps] == ["migration", "reset"], steps
    for e, span, n in steps:
        assert n > 0 and span <= e["seconds"] < 1.0, (e, span, n)


def test_failed_incoming_migration_closes_its_window(qemu, tmp_path):
    """A stream that breaks off: QEMU 10 (exit-on-error=false) stays up and ends the
    migration window; a vCPU hot-added afterwards is phase hotplug, not migration.
    QEMU 7.2 exits on a failed load, which ends everything."""
    state = tmp_path / "vm.state"
    save_state(qemu, state)
    broken = tmp_path / "broken.state"
    broken.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with DemoQemu("mig-fail", smp="1,maxcpus=2", extra=["-incoming", "defer"], qemu=qemu) as dst:
        w = Watcher(dst.pid)
        args: dict[str, object] = {"uri": f"exec:cat {broken}"}
        if qemu is not None:
            args["exit-on-error"] = False  # QEMU >= 9.1
        dst.cmd("migrate-incoming", **args)
        if qemu is None:
            assert dst.proc.wait(30) != 0, "QEMU 7.2 should exit on a failed incoming load"
            rc, events = w.wait()
            assert rc == 0 and events[-1]["stopped_by"] == "target exit", w.stderr
            assert "migration_load" in {e["event"] for e in events if e["kind"] == "lifecycle"}
            return
        wait_migration(dst, "failed")
        dst.hotplug_cpu()
        time.sleep(0.5)
        dst.quit()
        rc, events = w.wait()
    assert rc == 0, w.stderr
    ev = events[:-1]
    hot = writes(ev, vcpu=1)
    assert hot and {e["phase"] for e in hot} == {"hotplug"}, Counter(e["phase"] for e in hot)
    assert_no_unexpected(events)
    lifecycle = [e["event"] for e in ev if e["kind"] == "lifecycle"]
    assert lifecycle.index("migration_load") < lifecycle.index("migration_done")


def test_loadvm_is_its_own_reset_cause(qemu, tmp_path):
    """loadvm resets the machine with cause snapshot-load, for which QEMU sends no QMP
    RESET: it is counted under that cause, never as a guest reset, and the state it then
    loads is phase migration (QEMU loads it as it loads an incoming stream)."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    extra = ["-drive", f"file={disk},if=none,id=d0,format=qcow2",
             "-device", "virtio-blk-pci,drive=d0"]
    with DemoQemu("loadvm", extra=extra, qemu=qemu) as vm:
        w = Watcher(vm.pid)
        vm.cmd("cont")
        time.sleep(0.3)
        vm.cmd("stop")
        for line in ("savevm s1", "loadvm s1"):
            out = vm.cmd("human-monitor-command", **{"command-line": line})
            assert not str(out).strip(), f"{line}: {out}"
        vm.cmd("system_reset")
        time.sleep(0.3)
        resets = qmp_resets(vm)
        vm.quit()
        rc, events = w.wait()
    assert rc == 0, w.stderr
    ev, summary = events[:-1], events[-1]
    assert summary["resets"].pop("snapshot-load") == 1
    assert summary["resets"] == dict(resets) == {"host-qmp-system-reset": 1}
    assert_no_unexpected(events)
    assert [st["step"] for st in summary["steps"]] == ["reset", "migration", "reset"]
    lapic = writes(ev, vcpu=0, event="KVM_SET_LAPIC")
    phases = [(e["phase"], e.get("cause")) for e in lapic]
    assert ("reset", "snapshot-load") in phases and ("migration", None) in phases, phases
    assert phases.index(("reset", "snapshot-load")) < phases.index(("migration", None)) \
        < phases.index(("reset", "host-qmp-system-reset"))


@pytest.mark.parametrize("how", ["duration", "SIGINT", "SIGTERM", "target exit"])
def test_every_exit_path_detaches(kvm_caps, how):
    before = bpf_state()
    with DemoQemu(f"exit-{how.replace(' ', '-')}") as vm:
        args = ("--duration", "1.5") if how == "duration" else ()
        w = Watcher(vm.pid, *args)
        vm.cmd("cont")
        if how == "SIGINT":
            w.proc.send_signal(signal.SIGINT)
        elif how == "SIGTERM":
            w.proc.send_signal(signal.SIGTERM)
        elif how == "target exit":
            vm.quit()
        rc, events = w.wait(30)
    assert rc == 0, w.stderr
    assert events and events[-1]["kind"] == "summary"
    assert events[-1]["stopped_by"] == how
    assert "Traceback" not in w.stderr
    assert wait_settled(before) == {}


def test_sigint_while_events_flow(kvm_caps):
    """Ctrl-C may land inside the ring-buffer callback, or twice (an impatient operator):
    watch must still stop, summarise and detach, every time."""
    before = bpf_state()
    with DemoQemu("sigint-busy", paused=False, extra=["-boot", "reboot-timeout=0"]) as vm:
        for delay in (0.3, 0.7, 1.1, 1.6, 2.2):
            w = Watcher(vm.pid)
            time.sleep(delay)
            w.proc.send_signal(signal.SIGINT)
            time.sleep(0.02)
            w.proc.send_signal(signal.SIGINT)
            rc, events = w.wait(15)
            assert rc == 0, w.stderr
            assert events[-1]["kind"] == "summary" and events[-1]["stopped_by"] == "SIGINT"
            assert "Traceback" not in w.stderr and "Exception ignored" not in w.stderr
        assert qmp_resets(vm)["guest-reset"] >= 1  # events were flowing
    assert wait_settled(before) == {}


def test_sigkill_of_the_tracer_leaves_nothing_while_qemu_runs(kvm_caps):
    """The kernel drops what a killed tracer held; QEMU goes on, untraced, unharmed."""
    before = bpf_state()
    with DemoQemu("killed-tracer", paused=False) as vm:
        w = Watcher(vm.pid)
        assert added(before, bpf_state()).get("progs")
        w.proc.kill()
        w.proc.wait(10)
        assert wait_settled(before) == {}
        assert vm.proc.poll() is None and vm.cmd("query-status")["status"] == "running"
