"""Tracker: the QEMU processes we own, and their entries in the BPF maps.

The one place that adopts a QEMU process (at its exec or KVM_CREATE_VM, seen by the kernel;
at a /proc rescan; for watch, by pid), follows it and forgets it.  A process is identified
by (pid, start time) in user space and by a VM id in the kernel: every per-VM map is keyed
by that id, never by pid, so a reused pid is never mixed with its predecessor and an exec
starts from empty state.  watch = tracker + printer; daemon = tracker + collector + server.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from qtrace_bpf.contract import abi
from qtrace_bpf.errors import AttachError, QtraceError
from qtrace_bpf.log import Log, null_log
from qtrace_bpf.program.vm_maps import TrackerMaps
from qtrace_bpf.symbols.binaries import AttachPlan, QemuBinaries
from qtrace_bpf.vms import targets
from qtrace_bpf.vms.targets import Target


class GapKey(NamedTuple):
    vm: str  # "" for the whole host
    reason: str


@dataclass
class TracedVm:
    vm_id: int  # the key of its map entries
    pid: int
    start_time: int  # /proc/PID/stat starttime: (pid, start_time) is the process
    name: str  # the `vm` label: sanitised; made unique among live VMs once it is one
    uuid: str
    exe: str  # the binary, as an operator names it
    plan: AttachPlan
    found_by: str  # "exec" (the kernel saw it start) | "scan" (found running)
    exited_at: float | None = None
    has_vcpus: bool = False  # only a process that creates a vCPU is a VM
    vcpu_fds: dict[int, int] = field(default_factory=dict)  # fd -> vCPU id when adopted

    @property
    def qemu_version(self) -> str:
        return self.plan.resolution.qemu_version or ""

    @property
    def build_id(self) -> str:
        return self.plan.resolution.build_id or ""


class Tracker:
    def __init__(self, maps: TrackerMaps, binaries: QemuBinaries, *, max_vms: int,
                 grace: float, log: Log | None = None,
                 forgotten: list[Callable[[TracedVm], None]] | None = None):
        self.maps = maps  # the program's VmMaps (the unit tests': a fake of the Protocol)
        self.binaries = binaries
        self.max_vms = max_vms
        self.grace = grace
        self.log = log or null_log
        self.lock = threading.RLock()
        self.vms: dict[int, TracedVm] = {}
        self.refused = 0  # VMs not traced: max_vms reached, or the procs map full
        # times counting stopped or started late (note_gap): "found_running" (adopted by a
        # scan: its earlier writes were not counted); the daemon adds restart reasons
        self.gaps: Counter[GapKey] = Counter()
        self.not_vms = 0  # QEMU processes that exited without a vCPU (capability probes)
        self.attach_errors: dict[str, int] = {}  # reason -> count
        # "VM forgotten": each is called (under the lock) before a VM's map entries are
        # deleted; the exporter subscribes to carry a restarted domain's counts over.
        self.forgotten: list[Callable[[TracedVm], None]] = forgotten if forgotten is not None \
            else []
        self._next_user_id = abi.USER_VM_ID_BASE

    def note_gap(self, reason: str, vm: str = "", times: int = 1) -> None:
        """Counting stopped or started late (qtrace_counting_gaps_total{vm,reason}); vm ""
        for the whole host (a restart that could not continue: layout_replaced, ...)."""
        self.gaps[GapKey(vm, reason)] += times

    def note_attach_error(self, reason: str) -> None:
        """A binary or process that could not be traced (AttachError.reason)."""
        self.attach_errors[reason] = self.attach_errors.get(reason, 0) + 1

    # -- adopt ---------------------------------------------------------------------

    def live(self, pid: int) -> TracedVm | None:
        for vm in self.vms.values():
            if vm.pid == pid and vm.exited_at is None:
                return vm
        return None

    def adopt(self, pid: int, found_by: str, vm_id: int | None = None,
              target: Target | None = None) -> TracedVm | None:
        """Start tracking one QEMU process; None (and its kernel entries dropped) if not.

        vm_id: the id the kernel gave it at exec.  Without one, the kernel's entry is
        reused when it has one (an event not handled yet, a restart), else the process is
        tracked from now on, which is a gap in its counts.  target: the process as the
        caller already read it from /proc (read here otherwise).
        """
        with self.lock:
            try:
                target = target or targets.open_target(pid)
            except QtraceError as exc:
                self._drop_kernel(pid, vm_id)
                self.log("not adopted", level="debug", pid=pid, reason=exc)
                return None
            start = target.start_time
            old = self.live(pid)
            if old is not None:
                if old.start_time == start and vm_id in (None, old.vm_id):
                    return old  # already ours: the kernel's windows stay as they are
                self.exited(old.vm_id)  # pid reused, or the process exec'd again
            display = target.exe
            known = len(self.binaries.plans)
            try:
                plan = self.binaries.get(target.exe_path, display, pid)
            except AttachError as exc:
                self._drop_kernel(pid, vm_id)
                if not targets.alive(pid, start):
                    exc.reason = "vanished"  # it went away while we looked: not worth a warning
                self.note_attach_error(exc.reason)
                quiet = exc.reason in ("vanished", "untrusted_binary")  # gone; logged once
                self.log("not traced", level="debug" if quiet else "warning",
                         pid=pid, vm=target.name, reason=exc.reason, error=exc)
                return None
            # read again: attaching a binary takes up to seconds, while QEMU creates vCPUs
            fds = targets.vcpu_fds(pid)
            kernel = self.maps.proc(pid)
            if vm_id is None and kernel is not None:
                vm_id = kernel.vm
            late = vm_id is None
            if fds and not self._room_for_vm():
                return self._refuse(pid, vm_id, target.name, "max_vms reached")
            # Processes without a vCPU yet (a VM at exec, capability probes) hold no VM slot;
            # they are bounded apart, so that they can never refuse a VM that holds vCPUs
            if not fds and sum(1 for v in self.vms.values()
                               if not v.has_vcpus and v.exited_at is None) >= self.max_vms:
                return self._refuse(pid, vm_id, target.name, "max_vms processes without a "
                                    "vCPU tracked")
            if late:
                vm_id = self._new_user_id()
                # A QEMU holding vCPU fds has created its machine: boot is over.
                try:
                    self.maps.insert_proc(pid, vm_id, boot_done=bool(fds))
                except QtraceError as exc:  # the procs map is full: refused, never fatal
                    return self._refuse(pid, None, target.name, str(exc))
                self.maps.set_vcpu_fds(vm_id, fds)
            elif len(self.binaries.plans) > known and fds:
                # Its binary was attached only now: its boot windows were never seen.
                self.maps.set_boot_done(pid)
            vm = TracedVm(vm_id, pid, start, target.name, target.uuid, display, plan, found_by,
                          vcpu_fds=fds)
            if fds:
                self._became_vm(vm)
            if late:
                self.note_gap("found_running", vm.name)
                self.log("counting gap: found running, counted from now on", level="warning",
                         vm=vm.name, pid=pid)
            self.vms[vm_id] = vm
            self.log("tracking", vm=vm.name, pid=pid, vm_id=f"{vm_id:#x}", found_by=found_by,
                     uuid=vm.uuid or None)
            return vm

    def _refuse(self, pid: int, vm_id: int | None, name: str, why: str) -> None:
        self.refused += 1
        self._drop_kernel(pid, vm_id)
        self.log("VM refused", level="warning", pid=pid, vm=name, reason=why,
                 max_vms=self.max_vms)
        return None

    def _room_for_vm(self) -> bool:
        """Is there a slot for one more VM?  Slots are held by processes that created a
        vCPU, live or exited within the grace period; the oldest exited VM gives its slot
        (its series go early) before a live VM is refused."""
        while sum(1 for v in self.vms.values() if v.has_vcpus) >= self.max_vms:
            if not self._expire_oldest():
                return False
        return True

    def _expire_oldest(self) -> bool:
        exited = [v for v in self.vms.values() if v.exited_at is not None]
        if not exited:
            return False
        oldest = min(exited, key=lambda v: v.exited_at or 0.0)
        self.forget(oldest.vm_id)
        self.log("forgotten early: its slot is needed", vm=oldest.name, pid=oldest.pid)
        return True

    def _new_user_id(self) -> int:
        self._next_user_id += 1
        return self._next_user_id

    def _became_vm(self, vm: TracedVm) -> None:
        """It created a vCPU: from now on it is exported, under a name no live VM has.
        (A -daemonize parent or a capability probe of the same name never takes it.)"""
        live = {v.name for v in self.vms.values()
                if v.has_vcpus and v.exited_at is None and v.vm_id != vm.vm_id}
        if vm.name in live:
            vm.name = f"{vm.name}~{vm.vm_id & 0x7FFFFFFF}"[-targets.VM_NAME_MAX:]
        vm.has_vcpus = True

    def _drop_kernel(self, pid: int, vm_id: int | None) -> None:
        """Forget what the kernel tracked for a process we do not adopt."""
        kernel = self.maps.proc(pid)
        if kernel is not None and (vm_id is None or kernel.vm == vm_id):
            self.maps.delete_proc(pid)
            vm_id = kernel.vm
        if vm_id is not None and vm_id not in self.vms:
            self.maps.delete_vms([vm_id])

    # -- follow --------------------------------------------------------------------

    def follow(self, ev) -> None:
        """A ring-buffer event: exec adopts, exit marks the VM exited."""
        if ev.kind == abi.K_EXEC:
            self.adopt(ev.tgid, "exec", ev.vm)
        elif ev.kind == abi.K_EXIT:
            with self.lock:
                if ev.vm in self.vms:
                    self.exited(ev.vm)
                else:
                    self.maps.delete_vms([ev.vm])  # a process we never adopted

    def exited(self, vm_id: int) -> None:
        with self.lock:
            vm = self.vms.get(vm_id)
            if vm is None or vm.exited_at is not None:
                return
            vm.exited_at = time.monotonic()
            kernel = self.maps.proc(vm.pid)
            if kernel is not None and kernel.vm == vm_id:
                self.maps.delete_proc(vm.pid)
            if not self._confirm(vm):
                self.not_vms += 1
                self.forget(vm_id)  # never exported: nothing to keep for a grace period
                self.log("exited without creating a vCPU: not a VM", level="debug",
                         vm=vm.name, pid=vm.pid)
                return
            self.log("exited", vm=vm.name, pid=vm.pid, series_kept_s=self.grace)

    # -- forget --------------------------------------------------------------------

    def forget(self, vm_id: int) -> None:
        """Delete the VM's entries from every per-VM map (abi.PER_VM_MAPS) and its record."""
        with self.lock:
            vm = self.vms.get(vm_id)
            if vm is not None and vm.has_vcpus:
                for subscriber in self.forgotten:
                    subscriber(vm)
            self.vms.pop(vm_id, None)
            if vm is not None:
                kernel = self.maps.proc(vm.pid)
                if kernel is not None and kernel.vm == vm_id:
                    self.maps.delete_proc(vm.pid)
            self.maps.delete_vms([vm_id])

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            for vm in list(self.vms.values()):
                if vm.exited_at is not None and now - vm.exited_at >= self.grace:
                    self.forget(vm.vm_id)
                    self.log("forgotten", vm=vm.name, pid=vm.pid)

    def rescan(self) -> None:
        """Reconcile with /proc: exits we missed, processes we have not seen, stale entries."""
        with self.lock:
            in_maps = self.maps.vm_ids_in_maps()
            kernel_before = self.maps.procs()
            running = targets.running_qemus()  # pid -> start time
            for vm in list(self.vms.values()):
                if vm.exited_at is None and running.get(vm.pid) != vm.start_time:
                    self.exited(vm.vm_id)  # an exit we did not see
            for pid in sorted(running):
                live = self.live(pid)
                if live is None or live.start_time != running[pid]:
                    self.adopt(pid, "scan")
            for pid in kernel_before:
                if pid not in running:  # gone (its exit event was lost)
                    kernel = self.maps.proc(pid)
                    if kernel is not None and kernel.vm == kernel_before[pid]:
                        self.maps.delete_proc(pid)
            alive = set(self.maps.procs().values())
            orphans = in_maps - set(self.vms) - alive
            if orphans:
                n = self.maps.delete_vms(orphans)
                self.log("rescan removed stale map entries", entries=n, vm_ids=len(orphans))

    def _confirm(self, vm: TracedVm, with_vcpus: set[int] | None = None) -> bool:
        if not vm.has_vcpus:
            ids = self.maps.vm_ids_with_vcpus() if with_vcpus is None else with_vcpus
            if vm.vm_id in ids:
                if not self._room_for_vm():  # it became a VM with every slot taken
                    self.refused += 1
                    self.log("VM refused", level="warning", pid=vm.pid, vm=vm.name,
                             reason="max_vms reached", max_vms=self.max_vms)
                    self.forget(vm.vm_id)
                    return False
                self._became_vm(vm)
        return vm.has_vcpus

    def snapshot(self) -> dict[int, TracedVm]:
        """The VMs to export, by id: processes that created a vCPU (live or in grace)."""
        with self.lock:
            pending = [vm for vm in self.vms.values() if not vm.has_vcpus]
            ids = self.maps.vm_ids_with_vcpus() if pending else set()
            for vm in pending:
                if vm.vm_id in self.vms:
                    self._confirm(vm, ids)
            return {i: vm for i, vm in self.vms.items() if vm.has_vcpus}
