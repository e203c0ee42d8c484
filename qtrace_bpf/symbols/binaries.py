"""QEMU binaries: catalog x symbols = attach points, attached once per file.

A uprobe belongs to an inode, so attachments are keyed by the file (device, inode): a
package reinstall with the same build-id is a new file to attach, and a VM running on a
replaced (deleted) file keeps its probes.  Each file is opened once (binfile.py): checked
as trusted, parsed from that fd, attached through it; its resolution is the file's own.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from qtrace_bpf.contract.catalog import Catalog, Probe, absent_in
from qtrace_bpf.errors import AttachError, ElfError
from qtrace_bpf.log import Log, null_log
from qtrace_bpf.symbols import elfsym, first_insn, resolver
from qtrace_bpf.symbols.binfile import TRUSTED_UIDS, BinaryFile, FileKey, open_binary
from qtrace_bpf.symbols.debugfiles import DEFAULT_DEBUG_ROOTS
from qtrace_bpf.symbols.debuginfod import Debuginfod
from qtrace_bpf.symbols.elf import UsdtSite
from qtrace_bpf.symbols.elfsym import Resolution, Symbol

UNTRUSTED_REMEMBERED = 1024  # files logged once each; older ones may be logged again


class Uprobe(NamedTuple):
    """One uprobe to attach in a binary file."""

    offset: int  # file offset
    slot: int  # the catalog probe it counts for
    # "entry", "return", or "blind": an entry whose registers are not the function's
    # arguments (a GCC clone that changes them, an inlined instance, a USDT site)
    kind: str
    semaphore: int  # a USDT site's enabling counter (file offset; 0: none)


@dataclass
class PlannedProbe:
    """One catalog probe as planned for a binary (or why it cannot be)."""

    probe: Probe
    symbol: Symbol | None
    function: str | None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    inlined_offsets: list[int] = field(default_factory=list)  # extra entry probes
    lost_detail: list[str] = field(default_factory=list)  # what a clone's entry cannot tell
    usdt: str | None = None  # the static probe used instead of a function ("qemu:name")
    usdt_sites: list[UsdtSite] = field(default_factory=list)

    @property
    def trust_args(self) -> bool:
        return self.symbol is None or self.symbol.args_trusted

    @property
    def ok(self) -> bool:
        return self.symbol is not None or bool(self.inlined_offsets) or bool(self.usdt_sites)

    def entry_offset(self, is_return: bool) -> int:
        """The file offset for the function's probe: its first emulated instruction when the
        ones before it change nothing the handler reads (the arguments the catalog reads; for
        a return probe, the stack pointer: the return address is read at *sp), else its
        first instruction.  A single-stepped hit costs ~20x an emulated one."""
        sym = self.symbol
        assert sym is not None
        if is_return:
            keep = {first_insn.RSP}
        else:
            keep = {first_insn.ARG_REGISTERS[n] for n, a in ((1, self.probe.arg1),
                                                            (2, self.probe.arg2))
                    if a and self.trust_args}
        moved = sym.entry_at and not keep.intersection(sym.entry_writes)
        return sym.offset + sym.entry_at if moved else sym.offset


@dataclass
class AttachPlan:
    key: FileKey
    path: str  # opens the very file that was parsed (/proc/self/fd/N of `file`)
    display: str  # what an operator calls it
    resolution: Resolution
    attached: list[PlannedProbe] = field(default_factory=list)
    file: BinaryFile | None = None  # held open while the plan lives

    @property
    def missing(self) -> list[PlannedProbe]:
        return [a for a in self.attached if not a.ok]

    @property
    def functions(self) -> dict[int, str]:
        """catalog slot -> the function probed for it."""
        return {a.probe.slot: a.function for a in self.attached if a.ok and a.function}

    def uprobes(self) -> list[Uprobe]:
        """Every uprobe of this plan."""
        out = []
        for att in self.attached:
            slot = att.probe.slot
            out += [Uprobe(off, slot, "blind", 0) for off in att.inlined_offsets]
            out += [Uprobe(site.offset, slot, "blind", site.semaphore)
                    for site in att.usdt_sites]
            if att.symbol is not None:
                out.append(Uprobe(att.entry_offset(False), slot,
                                  "entry" if att.trust_args else "blind", 0))
                if att.probe.has_return:
                    out.append(Uprobe(att.entry_offset(True), slot, "return", 0))
        return out


_ARG_LOSSES = {"shutdown_cause": "the reset cause (counted as cause unknown)",
               "level": "the put level (its writes carry none)",
               "hex": "the value passed (arg2)"}


def clone_losses(probe: Probe) -> list[str]:
    """What a probe cannot tell when it sits on a clone whose arguments are not read."""
    return [_ARG_LOSSES.get(a, a) for a in (probe.arg1, probe.arg2) if a]


def usdt_wanted() -> bool:
    """QTRACE_USDT=off: probe the catalog's functions even where the binary has the static
    probes the catalog prefers (to compare both sources)."""
    return os.environ.get("QTRACE_USDT", "on") != "off"


def plan_probes(catalog: Catalog, res: Resolution) -> list[PlannedProbe]:
    """catalog x symbols = attach points; anything that does not resolve says why."""
    out = []
    use_usdt = usdt_wanted()
    for probe in catalog.probes:
        chosen: PlannedProbe | None = None
        reasons = []
        for name in probe.usdt if use_usdt else ():
            sites = res.usdt.get(name)
            if sites:  # a static probe: a stable interface, where the build has it
                chosen = PlannedProbe(probe, None, f"usdt {name}", usdt=name, usdt_sites=sites,
                                      notes=[f"static probe {name} ({len(sites)} site(s)) "
                                             f"instead of {probe.functions[0]}"])
                break
        for fn in probe.functions if chosen is None else ():
            syms = res.found.get(fn)
            inlined = res.inlined_offsets(fn) if probe.attach_inlined else []
            if not syms and inlined:
                chosen = PlannedProbe(probe, None, fn, inlined_offsets=inlined, notes=[
                    f"{fn} has no out-of-line copy: probing its {len(inlined)} inlined "
                    "instance(s) from DWARF"])
                break
            if not syms:
                why = res.missing[fn].reason if fn in res.missing else "not resolved"
                reasons.append(f"{fn}: {why}")
                continue
            sym = res.best(fn)
            if sym is None:
                reasons.append(f"{fn}: ambiguous, {len(syms)} definitions "
                               f"({', '.join(f'{s.name}@{s.vaddr:#x}' for s in syms)})")
                continue
            notes = []
            lost = []
            if sym.is_clone:
                lost = [] if sym.args_trusted else clone_losses(probe)
                notes.append(f"GCC clone {sym.name}" + (
                    f": its registers need not hold {fn}'s arguments, not read "
                    f"(lost: {'; '.join(lost)})" if lost else ""))
            if inlined:
                notes.append(f"{fn} is also inlined at {len(inlined)} site(s): probed too")
            elif fn in probe.inlined or res.inlined.get(fn):
                notes.append(f"{fn} is inlined at some call sites: those calls are not seen")
            if fn != probe.functions[0]:
                notes.append(f"fallback for {probe.functions[0]} ({reasons[0]})")
            chosen = PlannedProbe(probe, sym, fn, notes=notes, inlined_offsets=inlined,
                              lost_detail=lost)
            break
        if chosen is None and absent_in(probe, res.qemu_version):
            reasons = [f"{probe.functions[0]}: not in QEMU {res.qemu_version} "
                       f"(exists since {probe.since})"]
        out.append(chosen or PlannedProbe(probe, None, None, reason="; ".join(reasons)))
    return out


def resolve(catalog: Catalog, path: str, display: str,
            debug_roots: tuple[str, ...] = DEFAULT_DEBUG_ROOTS,
            debuginfod: Debuginfod | None = None) -> Resolution:
    """Symbols for every catalog function (cached by build-id)."""
    names = catalog.functions
    return elfsym.resolve_cached(path, names, debug_roots=debug_roots, display=display,
                                 inline_names=names, debuginfod=debuginfod)


class QemuBinaries:
    """Every QEMU binary file seen, resolved and attached once (or why it could not be).

    isolate: resolve in a child process under `limits` (the daemon: a hostile file costs
    one failed resolution); tick is called while waiting for it."""

    def __init__(self, catalog: Catalog, attach: Callable[[AttachPlan], None],
                 debug_roots: tuple[str, ...] = DEFAULT_DEBUG_ROOTS,
                 debuginfod: Debuginfod | None = None,
                 log: Log | None = None, *,
                 detach: Callable[[AttachPlan], None] | None = None,
                 trusted_uids: tuple[int, ...] = TRUSTED_UIDS,
                 isolate: bool = False, limits: resolver.Limits = resolver.DEFAULT_LIMITS,
                 tick: Callable[[], None] | None = None):
        self.catalog = catalog
        self._attach = attach  # QtraceProgram.attach_binary
        self._detach = detach
        self.debug_roots = debug_roots
        self.debuginfod = debuginfod
        self.log = log or null_log
        self.trusted_uids = trusted_uids
        self.isolate, self.limits, self.tick = isolate, limits, tick
        self.plans: dict[FileKey, AttachPlan] = {}
        # files that could not be used, and why: not retried while they stay as they were
        self.errors: dict[FileKey, tuple[tuple[int, int], str]] = {}
        self.untrusted: OrderedDict[FileKey, str] = OrderedDict()  # bounded, for log-once
        self.untrusted_total = 0  # distinct untrusted files met (qtrace_untrusted_binaries)

    def open(self, path: str, display: str, pid: int | None = None) -> BinaryFile:
        """The file, open and trusted; AttachError otherwise (an untrusted file is counted
        and logged once)."""
        bf = open_binary(path, display, pid, self.trusted_uids)
        if bf.untrusted:
            bf.close()
            if bf.key not in self.untrusted:
                self.untrusted_total += 1
                self.log("binary not probed: untrusted", level="warning", binary=display,
                         pid=pid, reason=bf.untrusted)
                if len(self.untrusted) >= UNTRUSTED_REMEMBERED:
                    self.untrusted.popitem(last=False)
            self.untrusted[bf.key] = bf.untrusted
            self.untrusted.move_to_end(bf.key)
            raise AttachError(f"{display}: untrusted binary: {bf.untrusted} (only files that "
                              "no unprivileged user can write are probed)", "untrusted_binary")
        return bf

    def resolve(self, bf: BinaryFile) -> Resolution:
        names = tuple(self.catalog.functions)
        if self.isolate:
            return resolver.resolve_isolated(bf, names, self.debug_roots, self.debuginfod,
                                             self.limits, self.tick)
        return elfsym.resolve(bf.path, names, debug_roots=self.debug_roots,
                              display=bf.display, inline_names=names,
                              debuginfod=self.debuginfod)

    def get(self, path: str, display: str, pid: int | None = None,
            opened: tuple[BinaryFile, Resolution] | None = None) -> AttachPlan:
        """The plan of the file at `path`, attaching it the first time (AttachError if not).
        opened: the file and its resolution, when the caller already has them (watch)."""
        bf = opened[0] if opened else self.open(path, display, pid)
        key, version = bf.key, bf.version
        if key in self.plans:
            bf.close()
            return self.plans[key]
        try:
            if key in self.errors and self.errors[key][0] == version:
                raise AttachError(self.errors[key][1], "unusable_binary")
            try:
                res = opened[1] if opened else self.resolve(bf)
            except ElfError as exc:  # unusable as it is (a half-written file may change)
                self.errors[key] = (version, str(exc))
                self.log("binary unusable", level="warning", binary=display, reason=exc)
                raise AttachError(str(exc), "unusable_binary") from None
            if not bf.unchanged():
                raise AttachError(f"{display}: changed while it was read: retried later",
                                  "vanished")
            plan = AttachPlan(key, bf.path, display, res, plan_probes(self.catalog, res),
                              file=bf)
            self._attach(plan)  # all of the plan's uprobes, or none (then retried next time)
        except BaseException:
            bf.close()
            raise
        self.plans[key] = plan
        self.errors.pop(key, None)
        self._log_plan(plan)
        return plan

    def drop(self, keep: set[FileKey]) -> list[AttachPlan]:
        """Detach and close every plan whose file is not in `keep` (no live process maps
        it, no configured path names it): uprobes, link fds and the open file go."""
        gone = [p for k, p in self.plans.items() if k not in keep]
        for plan in gone:
            if self._detach is not None:
                self._detach(plan)
            if plan.file is not None:
                plan.file.close()
            del self.plans[plan.key]
            self.log("binary detached: no process uses it", binary=plan.display)
        for key in [k for k in self.errors if k not in keep]:
            del self.errors[key]
        return gone

    def close(self) -> None:
        for plan in self.plans.values():
            if plan.file is not None:
                plan.file.close()

    def _log_plan(self, plan: AttachPlan) -> None:
        """One line per binary: what attached, what is missing and what that costs."""
        res = plan.resolution
        missing = plan.missing
        self.log("binary attached", binary=plan.display, inode=f"{plan.key[0]}:{plan.key[1]}",
                 build_id=res.build_id or "-", qemu=res.qemu_version or "?",
                 probes=f"{len(plan.attached) - len(missing)}/{len(plan.attached)}",
                 missing=", ".join(a.probe.event for a in missing) or None,
                 lost="; ".join([f"{a.probe.event}: {a.probe.lost}" for a in missing] +
                                [f"{a.probe.event} (GCC clone {a.symbol.name}): "
                                 f"{', '.join(a.lost_detail)}"
                                 for a in plan.attached if a.lost_detail and a.symbol]) or None,
                 hint=res.debug_hint or None)

