"""What watch and the daemon use of a loaded program, however it was loaded (compiled here
by BCC, or opened from pins): its ring-buffer events, attaching a binary, polling.

Why a base: QtraceProgram and PinnedProgram differ in where fds come from, not in this.
"""

from __future__ import annotations

import ctypes as ct
from collections import deque

from qtrace_bpf.bpf import bpfsys
from qtrace_bpf.contract import abi
from qtrace_bpf.errors import QtraceError
from qtrace_bpf.program.attachments import Attachments
from qtrace_bpf.symbols.binaries import AttachPlan


class RunningProgram:
    state = "closed"
    links: Attachments
    _ring: bpfsys.RingBuffer | None = None

    def __init__(self) -> None:
        self.events: deque = deque()  # ring-buffer events (struct event copies), oldest first

    def _read_events(self, ring_fd: int) -> None:
        event, pending = abi.STRUCTS["event"], self.events

        def on_event(data: int, _size: int) -> None:
            pending.append(event.from_buffer_copy(ct.string_at(data, ct.sizeof(event))))

        self._ring = bpfsys.RingBuffer(ring_fd, on_event)

    @property
    def uprobe_count(self) -> int:
        return self.links.uprobe_count

    def attach_binary(self, plan: AttachPlan) -> None:
        """Every uprobe of the plan, or none (attachments.py)."""
        if self.state != "attached":
            raise QtraceError(f"BPF program is {self.state}, expected attached")
        self.links.attach_binary(plan)

    def detach_binary(self, plan: AttachPlan) -> None:
        """Every uprobe of the plan's file goes (no process uses that file any more)."""
        self.links.detach_binary(plan)

    def poll(self, timeout_ms: int) -> None:
        self._ring.poll(timeout_ms)

    def drain(self) -> None:
        self._ring.consume()

    def _stop_events(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
