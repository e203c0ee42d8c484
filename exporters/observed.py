"""The daemon as the exporter sees it: what the collectors may read at scrape time (and
nothing they may write), so that the exporter can be tested against a fake daemon."""

from __future__ import annotations

from typing import Any, Protocol

from qtrace_bpf.contract.catalog import Catalog


class Observed(Protocol):
    """The daemon as the exporter sees it: read at scrape time, never written."""

    catalog: Catalog
    ready: bool
    stage: str
    prog: Any  # QtraceProgram | None (None while starting): items(), hook_mode, ...
    tracker: Any  # Tracker: lock, snapshot(), counters of what it refused
    binaries: Any  # QemuBinaries: plans, errors
    http: Any  # the server, for its connection counters (None before it starts)
    resource_errors: dict[str, int]  # errno name -> times the loop ran out and retried
