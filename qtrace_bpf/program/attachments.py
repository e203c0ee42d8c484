"""Programs held on perf events by BPF links, pinned when pins are on: each QEMU binary's
uprobes (all or none), and the tracepoints of the kernel hook and of discovery.

Why apart: the same attachments are made for a program BCC has just compiled (watch, the
loader) and for one the daemon opened from its pins; only where a handler's program fd
comes from differs.  Every link made pushes its undo; close() runs them in reverse.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Callable

from qtrace_bpf.bpf import bpfsys, perf_events
from qtrace_bpf.bpf.pins import PinDir
from qtrace_bpf.errors import AttachError
from qtrace_bpf.log import Log
from qtrace_bpf.symbols.binaries import AttachPlan, Uprobe


class Attachments:
    """multi: uprobes as uprobe_multi links (one per binary and handler), for programs
    loaded for them (bpfsys.BPF_TRACE_UPROBE_MULTI); else one perf event and link per uprobe."""

    def __init__(self, prog_fd: Callable[[str], int], pins: PinDir | None, log: Log,
                 multi: bool = False):
        self.prog_fd = prog_fd  # handler name (qt_entry_3, tp_sched_exec) -> program fd
        self.pins = pins
        self.log = log
        self.multi = multi
        self.uprobe_count = 0
        self._undo: list[Callable[[], None]] = []
        # per binary file: (its link fds' undos, its link pins, its uprobe count)
        self._binaries: dict[tuple[int, int], tuple[list[Callable[[], None]], list[str], int]] = {}

    def link(self, fn_name: str, pin_name: str, open_event: Callable[[], int]) -> bool:
        """Hold fn_name on a perf event through a BPF link, pinned when pins are on (an
        identical program's pin is adopted as it is).  True when a new link was made."""

        def make(fd: int) -> int:
            perf = open_event()
            try:
                return bpfsys.link(fd, perf)
            finally:
                os.close(perf)

        return self.link_with(fn_name, pin_name, make)

    def link_with(self, fn_name: str, pin_name: str, make: Callable[[int], int]) -> bool:
        """make(program fd) -> link fd: a link of any kind (perf event, uprobe_multi,
        fentry), adopted from its pin or made, held, and pinned like the others."""
        fd = self.prog_fd(fn_name)
        kept = self.pins.adopt(pin_name, fd) if self.pins else None
        if kept is not None:
            self.hold(kept)
            return False
        link = make(fd)
        self.hold(link)
        if self.pins:
            self.pins.pin(link, pin_name)
        return True

    def hold(self, fd: int) -> None:
        """Keep fd open until close() (a link goes when its last fd and its pin go)."""
        self._undo.append(lambda: os.close(fd))

    def tracepoint(self, fn_name: str, category: str, name: str) -> None:
        self.link(fn_name, f"tp-{name}", lambda: perf_events.tracepoint_event(category, name))

    def kprobe(self, fn_name: str, function: str, retprobe: bool) -> None:
        self.link(fn_name, f"{'kr' if retprobe else 'k'}-{function}",
                  lambda: perf_events.kprobe_event(function, retprobe))

    def attach_binary(self, plan: AttachPlan) -> None:
        """Every uprobe of the plan, or none: a failure undoes this binary's attaches.
        Links are named by the file (device, inode), offset and slot: a restarted daemon
        finds its predecessor's and keeps them."""
        mark = len(self._undo)
        made: list[str] = []
        used: list[str] = []
        dev, ino = plan.key
        uprobes = plan.uprobes()
        replaced = len(self.pins.replaced) if self.pins else 0
        try:
            if self.multi:
                made += self._multi(plan, uprobes, used)
            for offset, slot, kind, ref in ([] if self.multi else uprobes):
                pin_name = f"u-{dev}-{ino}-{offset:x}-{slot}-{kind}" + (f"-r{ref:x}" if ref
                                                                         else "")
                used.append(pin_name)
                if self.link(f"qt_{kind}_{slot}", pin_name,
                             lambda o=offset, r=(kind == "return"), c=ref:
                             perf_events.uprobe_event(plan.path, o, r, c)):
                    made.append(pin_name)
        except AttachError as exc:
            self._undo_to(mark, made)
            exc.args = (f"{plan.display}: {exc}",)
            raise
        except BaseException:
            self._undo_to(mark, made)
            raise
        self.uprobe_count += len(uprobes)
        self._binaries[plan.key] = (self._undo[mark:], used, len(uprobes))
        del self._undo[mark:]
        self.log_replaced(replaced)

    def detach_binary(self, plan: AttachPlan) -> None:
        """Every uprobe of this binary goes: its links' fds closed and pins removed."""
        undo, pin_names, count = self._binaries.pop(plan.key, ([], [], 0))
        while undo:
            undo.pop()()
        for pin_name in pin_names:
            if self.pins:
                self.pins.unpin(pin_name)
        self.uprobe_count -= count

    def _multi(self, plan: AttachPlan, uprobes: list[Uprobe],
               used: list[str]) -> list[str]:
        """One uprobe_multi link per handler: its offsets in this file.  Pin names carry the
        offsets' digest: another build of the file at the same inode is another link."""
        by_handler: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for offset, slot, kind, ref in uprobes:
            by_handler.setdefault((slot, kind), []).append((offset, ref))
        made = []
        dev, ino = plan.key
        for (slot, kind), sites in sorted(by_handler.items()):
            sites = sorted(sites)
            offsets, refs = [o for o, _ in sites], [r for _, r in sites]
            digest = zlib.crc32(",".join(f"{o:x}:{r:x}" if r else f"{o:x}"
                                         for o, r in sites).encode())
            pin_name = f"u-{dev}-{ino}-{slot}-{kind}-{digest:08x}"
            used.append(pin_name)

            def make(fd: int, offsets=offsets, refs=refs, ret=(kind == "return")) -> int:
                try:
                    return bpfsys.link_uprobe_multi(fd, plan.path, offsets, ret, refs)
                except OSError as exc:
                    reason = "vanished" if exc.errno in (errno.ENOENT, errno.ESRCH) \
                        else "attach_failed"
                    raise AttachError(f"uprobes {plan.path}+{','.join(map(hex, offsets))}: "
                                      f"{exc.strerror}", reason) from None

            if self.link_with(f"qt_{kind}_{slot}", pin_name, make):
                made.append(pin_name)
        return made

    def log_replaced(self, since: int = 0) -> None:
        for pin_name in (self.pins.replaced[since:] if self.pins else []):
            self.log("pinned program differs from this one: replaced", level="warning",
                     link=pin_name)

    def _undo_to(self, mark: int, made_pins: list[str]) -> None:
        while len(self._undo) > mark:
            self._undo.pop()()
        for pin_name in made_pins:
            if self.pins:
                self.pins.unpin(pin_name)

    def close(self) -> None:
        """Close every link fd, last first; safe to call twice."""
        for undo, _pins, _n in reversed(list(self._binaries.values())):
            while undo:
                undo.pop()()
        self._binaries.clear()
        while self._undo:
            self._undo.pop()()
