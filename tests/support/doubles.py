"""In-memory doubles of what the tracker drives: the kernel's maps and the binaries' attach
plans.  tests/unit/test_tracker.py checks they implement the same Protocols as the real ones."""

from __future__ import annotations

from types import SimpleNamespace


class FakeMaps:
    """TrackerMaps on dicts (vm id -> entries of every per-VM map)."""

    def __init__(self) -> None:
        self.kernel: dict[int, SimpleNamespace] = {}  # procs: pid -> proc_state
        self.entries: dict[int, int] = {}  # vm id -> entries in per-VM maps
        self.vcpus: set[int] = set()  # vm ids that created a vCPU
        self.inserts = 0

    def proc(self, pid):
        return self.kernel.get(pid)

    def insert_proc(self, pid, vm, *, boot_done):
        self.inserts += 1
        if pid in self.kernel:
            return False
        self.kernel[pid] = SimpleNamespace(vm=vm, boot_done=int(boot_done), windows=0)
        return True

    def set_boot_done(self, pid):
        self.kernel[pid].boot_done = 1

    def delete_proc(self, pid):
        self.kernel.pop(pid, None)

    def procs(self):
        return {pid: st.vm for pid, st in self.kernel.items()}

    def set_vcpu_fds(self, vm, fds):
        self.entries[vm] = self.entries.get(vm, 0) + len(fds)
        if fds:
            self.vcpus.add(vm)

    def vm_ids_with_vcpus(self):
        return set(self.vcpus)

    def delete_vms(self, vms):
        self.vcpus -= set(vms)
        return sum(self.entries.pop(vm, 0) for vm in set(vms))

    def vm_ids_in_maps(self):
        return set(self.entries)


class FakeBinaries:
    def __init__(self) -> None:
        self.plans: dict = {}

    def get(self, path, display, res=None):
        plan = SimpleNamespace(resolution=SimpleNamespace(qemu_version="7.2", build_id="ab"))
        self.plans.setdefault(display, plan)
        return plan
