"""Typed access to the loaded program's maps: the processes and vCPU fds the Tracker
writes, the per-VM entries it deletes, and the counters watch and the exporter read.

Why a Protocol: Tracker takes `TrackerMaps`, not the program; the unit tests' fake
implements the same Protocol (tests/unit/test_tracker.py checks its signatures), so the two
cannot drift.  Key and value layouts are BCC's compile of probes/qtrace.h.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from qtrace_bpf.bpf import bpfsys
from qtrace_bpf.contract import abi, maps
from qtrace_bpf.errors import QtraceError


class TrackerMaps(Protocol):
    """What the Tracker needs of the kernel's maps."""

    def proc(self, pid: int) -> Any | None: ...
    def insert_proc(self, pid: int, vm: int, *, boot_done: bool) -> bool: ...
    def set_boot_done(self, pid: int) -> None: ...
    def delete_proc(self, pid: int) -> None: ...
    def procs(self) -> dict[int, int]: ...
    def set_vcpu_fds(self, vm: int, fds: dict[int, int]) -> None: ...
    def delete_vms(self, vms: Iterable[int]) -> int: ...
    def vm_ids_with_vcpus(self) -> set[int]: ...
    def vm_ids_in_maps(self) -> set[int]: ...


class VmMaps:
    """The maps of one loaded program (a TrackerMaps, and the counters' reader), opened by
    name through `open_map` (from BCC's fds, or from pins) and kept."""

    def __init__(self, open_map: Callable[[str], bpfsys.Map]) -> None:
        self._open = open_map
        self._tables: dict[str, bpfsys.Map] = {}

    def table(self, name: str) -> bpfsys.Map:
        if name not in self._tables:
            self._tables[name] = self._open(name)
        return self._tables[name]

    # -- processes (the Tracker decides which) -------------------------------------------

    def proc(self, pid: int):
        """The kernel's proc_state for pid, or None when the kernel does not track it."""
        try:
            return self.table(maps.PROCS)[ct.c_uint32(pid)]
        except KeyError:
            return None

    def insert_proc(self, pid: int, vm: int, *, boot_done: bool) -> bool:
        """Track pid as VM id `vm` unless the kernel already does (False then)."""
        table = self.table(maps.PROCS)
        leaf = table.Leaf()
        leaf.vm = vm
        leaf.boot_done = 1 if boot_done else 0
        try:
            return bpfsys.insert(table.map_fd, ct.c_uint32(pid), leaf)
        except QtraceError as exc:
            raise QtraceError(f"{maps.PROCS} map: cannot track pid {pid}: {exc} (map full? "
                              "raise max_vms)") from None

    def set_boot_done(self, pid: int) -> None:
        table = self.table(maps.PROCS)
        key = ct.c_uint32(pid)
        try:
            leaf = table[key]
        except KeyError:
            return
        leaf.boot_done = 1
        table[key] = leaf

    def delete_proc(self, pid: int) -> None:
        try:
            del self.table(maps.PROCS)[ct.c_uint32(pid)]
        except KeyError:
            pass

    def procs(self) -> dict[int, int]:
        """pid -> VM id, as the kernel tracks them now."""
        return {k.value: v.vm for k, v in self.table(maps.PROCS).items()}

    def set_vcpu_fds(self, vm: int, fds: dict[int, int]) -> None:
        table = self.table(maps.VCPU_FDS)
        for fd, vcpu in fds.items():
            key = table.Key()
            key.vm = vm
            key.fd = fd
            table[key] = ct.c_int32(vcpu)

    def delete_vms(self, vms: Iterable[int]) -> int:
        """Delete every entry of these VM ids from every per-VM map; returns how many."""
        gone = set(vms)
        n = 0
        if not gone:
            return 0
        for name in maps.PER_VM:
            table = self.table(name)
            for key in [k for k in table.keys() if k.vm in gone]:
                try:
                    del table[key]
                    n += 1
                except KeyError:
                    pass
        return n

    def vm_ids_with_vcpus(self) -> set[int]:
        """VM ids the kernel saw create a vCPU (or that were seeded with vCPU fds)."""
        return {k.vm for k in self.table(maps.VCPU_FDS).keys()}

    def vm_ids_in_maps(self) -> set[int]:
        ids: set[int] = set()
        for name in maps.PER_VM:
            ids |= {k.vm for k in self.table(name).keys()}
        return ids

    # -- counters ------------------------------------------------------------------------

    def items(self, name: str) -> list[tuple[object, int]]:
        """(key, count) of one counter map, read now: BPF_MAP_LOOKUP_BATCH, a few thousand
        entries a system call (BCC's items() makes two calls per key; its own batch reader
        allocates the map's whole max_entries)."""
        table = self.table(name)
        try:
            got = bpfsys.lookup_batch(table.map_fd, table.Key, table.Leaf)
        except QtraceError as exc:
            raise QtraceError(f"map {name}: {exc}") from None
        if got is None:  # a kernel without batch lookups
            return [(k, v.value) for k, v in table.items()]
        return got  # type: ignore[return-value]  # u64 leaves read back as ints

    def events_lost(self) -> dict[str, int]:
        """kind -> ring-buffer events dropped (the ring was full)."""
        table = self.table(maps.EVENTS_LOST)
        return {name: int(table[ct.c_int(k)].value) for k, name in abi.KINDS.items()}

    def update_failures(self) -> dict[str, int]:
        """map name -> inserts a full map refused."""
        table = self.table(maps.UPDATE_FAILED)
        return {name: int(table[ct.c_int(i)].value) for i, name in enumerate(abi.MAPS)}
