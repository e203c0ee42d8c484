"""PinnedProgram: the daemon's program, opened from the pins the loader left, with no BCC.

Why: BCC drags libLLVM and libclang into a process (~60 MB) and they stayed resident all the
daemon's life though used once at start.  Here maps, programs and the ring buffer are opened
by path in bpffs (BPF_OBJ_GET), uprobes are attached with the pinned programs' fds, and the
ring buffer is read with libbpf: the long-lived process maps no compiler.
"""

from __future__ import annotations

import os

from qtrace_bpf.bpf import bpfsys
from qtrace_bpf.bpf.pins import PinDir
from qtrace_bpf.contract import abi, maps
from qtrace_bpf.contract.catalog import Catalog
from qtrace_bpf.errors import QtraceError
from qtrace_bpf.log import Log, null_log
from qtrace_bpf.program.attachments import Attachments
from qtrace_bpf.program.loader import Manifest
from qtrace_bpf.program.running import RunningProgram
from qtrace_bpf.program.vm_maps import VmMaps


class PinnedProgram(RunningProgram):
    """Same surface as QtraceProgram for the daemon: maps, events, poll, attach_binary,
    close; hook_mode and the refusals come from what the loader wrote."""

    def __init__(self, catalog: Catalog, pins: PinDir, manifest: Manifest,
                 log: Log | None = None):
        super().__init__()
        self.catalog = catalog
        self.pins = pins
        self.log = log or null_log
        self.manifest = manifest
        self.hook_mode = manifest.hook
        self.uprobes = manifest.uprobes  # "multi" or "perf": how uprobes attach
        self.refusals = dict(manifest.refusals)  # known only when the loader just ran
        self.bcc_version = manifest.bcc
        self._fds: dict[str, int] = {}
        self.links = Attachments(self._prog_fd, pins, self.log, manifest.uprobes == "multi")
        try:
            for name in manifest.links:
                pins.claim(name)  # the loader's kernel-hook links: never pruned
            self.maps = VmMaps(self._map)
            self._read_events(self._fd("maps", maps.EVENTS))
        except BaseException:
            self.close(keep_pins=True)
            raise
        self.state = "attached"

    def _fd(self, kind: str, name: str) -> int:
        key = f"{kind}/{name}"
        if key not in self._fds:
            fd = bpfsys.get_pinned(os.path.join(self.pins.path, kind, name))
            if fd is None:
                raise QtraceError(f"pinned {key} missing under {self.pins.path} (removed by "
                                  "hand? restart the daemon: the loader pins it again)")
            self._fds[key] = fd
        return self._fds[key]

    def _prog_fd(self, name: str) -> int:
        return self._fd(os.path.join("progs", self.manifest.dirname), name)

    def _map(self, name: str) -> bpfsys.Map:
        key, value = maps.TYPES[name]
        return bpfsys.Map(self._fd("maps", name), abi.ctype(key), abi.ctype(value), name)

    def close(self, keep_pins: bool = False) -> None:
        """Close every fd (uprobe links go unless pinned); keep_pins=False unpins all."""
        self._stop_events()
        self.links.close()
        while self._fds:
            os.close(self._fds.popitem()[1])
        self.state = "closed"
        if not keep_pins:
            self.pins.remove()
