"""The daemon as the exporter sees it: what the collectors may read at scrape time (and
nothing they may write), so that the exporter can be tested against a fake daemon.

Each part is a small Protocol of exactly what the collectors read, so that the exporter
imports nothing of the engine but the contract (the layering test holds it to that)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from qtrace_bpf.contract.catalog import Catalog


class ProgramMaps(Protocol):
    """The loaded program's maps: rows of a counter map, and its own loss counters."""

    def items(self, name: str) -> Iterable[tuple[Any, int]]: ...

    def events_lost(self) -> dict[str, int]: ...

    def update_failures(self) -> dict[str, int]: ...


class Program(Protocol):
    hook_mode: str  # fentry | kprobe | tracepoint
    uprobes: str  # multi | perf
    maps: ProgramMaps


class Tracker(Protocol):
    """The VMs and what could not be traced (vms.tracker.Tracker)."""

    lock: AbstractContextManager[Any]
    vms: Mapping[int, Any]  # vm id -> TracedVm
    refused: int
    not_vms: int
    attach_errors: dict[str, int]
    gaps: Mapping[tuple[str, str], int]  # (vm, reason) -> times

    def snapshot(self) -> Mapping[int, Any]: ...


class Binaries(Protocol):
    """The QEMU binary files seen (symbols.binaries.QemuBinaries)."""

    plans: Mapping[tuple[int, int], Any]  # (dev, ino) -> AttachPlan
    errors: Mapping[tuple[int, int], Any]
    untrusted_total: int


class HttpCounters(Protocol):
    """The metrics server's connection counters (exporters.http.Server)."""

    active: int
    refused: int
    evicted: int
    timeouts: int
    limits: Any  # http.Limits: max_connections


class Observed(Protocol):
    """The daemon as the exporter sees it: read at scrape time, never written."""

    catalog: Catalog
    ready: bool
    stage: str
    prog: Program | None  # None while starting
    tracker: Tracker
    binaries: Binaries
    http: HttpCounters | None  # None before the server starts
    resource_errors: dict[str, int]  # errno name -> times the loop ran out and retried
    kubevirt_names: bool  # split NAMESPACE_NAME domain names into namespace and name labels
