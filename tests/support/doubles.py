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


class FakeProgramMaps:
    """ProgramMaps on lists of (key, count): keys are the ctypes structs of probes/qtrace.h
    (abi.ctype), so the collectors decode them exactly as they decode the kernel's."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[object, int]]] = {}
        self.lost: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def add(self, name: str, count: int, **key: int) -> None:
        from qtrace_bpf.contract import abi, maps

        self.rows.setdefault(name, []).append((abi.ctype(maps.TYPES[name][0])(**key), count))

    def items(self, name: str) -> list[tuple[object, int]]:
        return list(self.rows.get(name, []))

    def events_lost(self) -> dict[str, int]:
        return dict(self.lost)

    def update_failures(self) -> dict[str, int]:
        return dict(self.failed)


class FakeTracker:
    """The tracker as exporters/observed.py's Tracker Protocol reads it."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.RLock()
        self.vms: dict[int, object] = {}
        self.refused = 0
        self.not_vms = 0
        self.attach_errors: dict[str, int] = {}
        self.gaps: dict[tuple[str, str], int] = {}

    def snapshot(self) -> dict[int, object]:
        return {i: vm for i, vm in self.vms.items() if vm.has_vcpus}


class FakeObserved:
    """A daemon as exporters/observed.py's Observed reads it, with nothing running: what
    /metrics says can then be checked without root, BPF or a VM."""

    def __init__(self) -> None:
        from qtrace_bpf.contract.catalog import load_catalog

        self.catalog = load_catalog()
        self.ready = False
        self.stage = "loading the BPF program"
        self.prog: SimpleNamespace | None = None
        self.tracker = FakeTracker()
        self.binaries = SimpleNamespace(plans={}, errors={}, untrusted_total=0)
        self.http: SimpleNamespace | None = None
        self.resource_errors: dict[str, int] = {}
        self.kubevirt_names = False

    def start(self, hook_mode: str = "fentry", uprobes: str = "multi") -> FakeProgramMaps:
        """The program loaded: returns its maps, to fill."""
        self.prog = SimpleNamespace(hook_mode=hook_mode, uprobes=uprobes, bcc_version="0.26.0",
                                    maps=FakeProgramMaps())
        self.ready, self.stage = True, "tracing"
        return self.prog.maps

    def add_vm(self, vm_id: int, pid: int, name: str, *, has_vcpus: bool = True,
               exited_at: float | None = None, uuid: str = "", qemu_version: str = "7.2.22",
               build_id: str = "") -> None:
        from qtrace_bpf.vms.tracker import TracedVm

        plan = SimpleNamespace(resolution=SimpleNamespace(qemu_version=qemu_version,
                                                          build_id=build_id))
        self.tracker.vms[vm_id] = TracedVm(
            vm_id=vm_id, pid=pid, start_time=1000 + pid, name=name, uuid=uuid,
            exe="/usr/bin/qemu-system-x86_64", plan=plan, found_by="exec",
            exited_at=exited_at, has_vcpus=has_vcpus)
