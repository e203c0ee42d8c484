"""Tracker: adopt, follow and forget QEMU processes; own their map entries.

Most tests run a real process named qemu-system-x86_64 (a copy of dash) against in-memory
maps (FakeMaps, a TrackerMaps); the last one uses the real BPF program's maps.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest
from support.doubles import FakeBinaries, FakeMaps

from qtrace_bpf.contract import abi
from qtrace_bpf.program.vm_maps import TrackerMaps, VmMaps
from qtrace_bpf.vms import targets
from qtrace_bpf.vms.tracker import Tracker


@pytest.mark.parametrize("impl", [FakeMaps, VmMaps])
def test_map_doubles_implement_the_tracker_protocol(impl):
    """The fake and the real maps offer every TrackerMaps method with its signature: a
    method the Tracker starts to use (or a changed one) cannot pass on the fake alone."""
    import inspect

    wanted = {n: inspect.signature(f) for n, f in vars(TrackerMaps).items()
              if not n.startswith("_") and callable(f)}
    assert len(wanted) >= 9
    for name, sig in wanted.items():
        got = inspect.signature(getattr(impl, name))
        assert list(got.parameters) == list(sig.parameters), (impl.__name__, name)
        assert [p.kind for p in got.parameters.values()] == \
            [p.kind for p in sig.parameters.values()], (impl.__name__, name)


@pytest.fixture
def qemu(tmp_path, monkeypatch):
    """A process whose exe is named qemu-system-x86_64 (a shell, copied) with a -name."""
    exe = tmp_path / "qemu-system-x86_64"
    shutil.copy(shutil.which("dash") or "/bin/sh", exe)
    procs = []
    real = targets.running_qemus
    # rescan sees only this test's processes, not other QEMUs on the host
    monkeypatch.setattr(targets, "running_qemus", lambda: {
        pid: st for pid, st in real().items() if pid in {p.pid for p in procs}})

    def start(name: str = "vm-a"):
        p = subprocess.Popen([str(exe), "-c", "sleep 600; :", "-name", f"guest={name}"])
        procs.append(p)
        deadline = time.monotonic() + 10
        while "-name" not in targets.read_cmdline(p.pid):  # exec done
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def tracker(prog=None, **kw) -> Tracker:
    return Tracker(prog or FakeMaps(), FakeBinaries(), max_vms=kw.pop("max_vms", 8),
                   grace=kw.pop("grace", 0), **kw)


def test_scan_adopts_with_a_user_id_and_counts_a_gap(qemu):
    p = qemu("web1")
    t = tracker()
    vm = t.adopt(p.pid, "scan")
    assert vm is not None and vm.name == "web1" and vm.vm_id > abi.USER_VM_ID_BASE
    assert t.maps.kernel[p.pid].vm == vm.vm_id and sum(t.gaps.values()) == 1


def test_rescan_never_overwrites_kernel_window_state(qemu):
    """A process the kernel tracks since its exec keeps its id and its windows."""
    p = qemu()
    t = tracker()
    t.maps.kernel[p.pid] = SimpleNamespace(vm=77, boot_done=0, windows=abi.W_RESET)
    t.rescan()
    vm = t.live(p.pid)
    assert vm is not None and vm.vm_id == 77 and not t.gaps
    assert t.maps.kernel[p.pid].windows == abi.W_RESET and t.maps.inserts == 0
    t.rescan()  # already tracked: nothing written
    assert t.maps.inserts == 0 and t.live(p.pid) is vm


def test_exec_of_a_tracked_pid_starts_a_new_vm(qemu):
    p = qemu()
    t = tracker()
    first = t.adopt(p.pid, "exec", 10)
    t.maps.entries[10] = 5
    t.maps.vcpus.add(10)
    second = t.follow(SimpleNamespace(kind=abi.K_EXEC, tgid=p.pid, vm=11)) or t.live(p.pid)
    assert second.vm_id == 11 and first.exited_at is not None
    assert t.vms[10] is first  # kept for the grace period, then forgotten
    t.expire()
    assert 10 not in t.vms and 10 not in t.maps.entries


def test_reused_pid_is_not_its_predecessor(qemu, monkeypatch):
    p = qemu()
    t = tracker()
    old = t.adopt(p.pid, "scan")
    real = targets.start_time
    monkeypatch.setattr(targets, "start_time", lambda pid: real(pid) + 1)
    monkeypatch.setattr(targets, "running_qemus", lambda: {p.pid: real(p.pid) + 1})
    t.rescan()
    new = t.live(p.pid)
    assert new is not None and new.vm_id != old.vm_id and old.exited_at is not None


def test_exit_event_and_missed_exit(qemu):
    a, b = qemu("a"), qemu("b")
    t = tracker(grace=3600)
    va, vb = t.adopt(a.pid, "exec", 1), t.adopt(b.pid, "exec", 2)
    t.maps.vcpus |= {1, 2}
    t.maps.kernel[a.pid] = SimpleNamespace(vm=1)
    t.maps.kernel[b.pid] = SimpleNamespace(vm=2)
    t.follow(SimpleNamespace(kind=abi.K_EXIT, tgid=a.pid, vm=1))
    assert va.exited_at is not None
    b.kill()
    b.wait()
    t.rescan()  # its exit event was lost: /proc says it is gone
    assert vb.exited_at is not None and b.pid not in t.maps.kernel


def test_rescan_drops_entries_nobody_owns(qemu, monkeypatch):
    t = tracker()
    t.maps.entries[999] = 4  # counted by a process whose exit we never saw
    t.maps.kernel[2 ** 22 + 1] = SimpleNamespace(vm=998)  # a pid that does not exist
    t.maps.entries[998] = 2
    t.rescan()
    assert t.maps.entries == {} and t.maps.kernel == {}


def test_exit_of_a_process_never_adopted_drops_its_entries():
    t = tracker()
    t.maps.entries[55] = 3
    t.follow(SimpleNamespace(kind=abi.K_EXIT, tgid=1, vm=55))
    assert 55 not in t.maps.entries


def test_max_vms_refuses_and_drops_what_it_counted(qemu):
    a, b = qemu("a"), qemu("b")
    t = tracker(max_vms=1)
    assert t.adopt(a.pid, "exec", 1) is not None
    t.maps.kernel[b.pid] = SimpleNamespace(vm=2)
    t.maps.entries[2] = 7
    assert t.adopt(b.pid, "exec", 2) is None
    assert t.refused == 1 and 2 not in t.maps.entries and b.pid not in t.maps.kernel


def test_names_are_unique_among_live_vms_only(qemu):
    a, b = qemu("dup"), qemu("dup")
    t = tracker(grace=3600)
    va = t.adopt(a.pid, "exec", 1)
    vb = t.adopt(b.pid, "exec", 2)
    t.maps.vcpus |= {1, 2}  # both become VMs
    t.snapshot()
    assert va.name == "dup" and vb.name == "dup~2"
    t.exited(1)
    assert 1 in t.vms  # kept for the grace period
    c = qemu("dup")
    vc = t.adopt(c.pid, "exec", 3)
    t.maps.vcpus.add(3)
    t.snapshot()
    assert vc.name == "dup"  # a restarted domain keeps its name


def test_a_process_that_never_becomes_a_vm_takes_no_name(qemu):
    """A -daemonize parent (or a capability probe) named like the VM does not rename it."""
    parent, child = qemu("d"), qemu("d")
    t = tracker()
    t.adopt(parent.pid, "exec", 1)
    vc = t.adopt(child.pid, "exec", 2)
    t.maps.vcpus.add(2)
    assert list(t.snapshot()) == [2] and vc.name == "d"


def test_a_process_without_vcpus_is_never_a_vm(qemu):
    """libvirt's capability probes: tracked, never exported, gone at exit."""
    p = qemu("probe")
    t = tracker(grace=3600)
    vm = t.adopt(p.pid, "exec", 5)
    t.maps.entries[5] = 1
    assert vm is not None and t.snapshot() == {}
    t.exited(5)
    assert 5 not in t.vms and 5 not in t.maps.entries and t.not_vms == 1
    q = qemu("real")
    t.adopt(q.pid, "exec", 6)
    t.maps.vcpus.add(6)  # KVM_CREATE_VCPU seen by the kernel
    assert list(t.snapshot()) == [6]


def test_not_a_qemu_is_not_adopted_and_its_kernel_entry_goes():
    p = subprocess.Popen(["sleep", "60"])
    try:
        t = tracker()
        t.maps.kernel[p.pid] = SimpleNamespace(vm=9)
        t.maps.entries[9] = 1
        assert t.adopt(p.pid, "exec", 9) is None
        assert p.pid not in t.maps.kernel and 9 not in t.maps.entries
    finally:
        p.kill()
        p.wait()


def test_an_exited_vm_gives_its_slot_before_a_live_vm_is_refused(qemu):
    """Exported VMs are capped with those in their grace period counted: at the cap the
    oldest exited VM's series go early, and a live VM is not refused for it."""
    a, b = qemu("a"), qemu("b")
    t = tracker(max_vms=1, grace=3600)
    t.adopt(a.pid, "exec", 1)
    t.maps.vcpus.add(1)
    assert list(t.snapshot()) == [1]
    t.exited(1)
    t.adopt(b.pid, "exec", 2)
    t.maps.vcpus.add(2)
    assert list(t.snapshot()) == [2], "b became a VM in a's slot"
    assert 1 not in t.vms and 1 not in t.maps.entries and t.refused == 0


def test_processes_without_vcpus_have_a_budget_apart(qemu):
    """Capability probes (or anything running a trusted QEMU without a vCPU) are bounded,
    and a VM holding vCPUs is counted against max_vms only."""
    probes = [qemu(f"probe{i}") for i in range(3)]
    t = tracker(max_vms=2)
    assert [t.adopt(p.pid, "exec", 10 + i) is not None for i, p in enumerate(probes)] == \
        [True, True, False]
    assert t.refused == 1 and t.snapshot() == {}


def test_a_full_procs_map_is_a_refusal_not_a_crash(qemu):
    from qtrace_bpf.errors import QtraceError

    p = qemu("full")
    t = tracker()

    def full(*_a, **_kw):
        raise QtraceError("procs map: cannot track pid: map full")

    t.maps.insert_proc = full
    assert t.adopt(p.pid, "scan") is None
    assert t.refused == 1 and not t.vms
