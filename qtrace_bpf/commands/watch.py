"""`qprobe watch PID`: tracker + printer, until duration, signal, or the process's exit."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable

from qtrace_bpf.commands.watch_filter import EventFilter
from qtrace_bpf.contract import maps
from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.contract.events import Decoder, render
from qtrace_bpf.logfmt import kv
from qtrace_bpf.program.compiled import QtraceProgram
from qtrace_bpf.symbols.binaries import QemuBinaries
from qtrace_bpf.symbols.debugfiles import DEFAULT_DEBUG_ROOTS
from qtrace_bpf.symbols.debuginfod import Debuginfod
from qtrace_bpf.vms import targets
from qtrace_bpf.vms.tracker import TracedVm, Tracker


def log_stderr(msg: str, **fields: object) -> None:
    fields.pop("level", None)
    print(f"qprobe: {msg}{kv(**fields)}", file=sys.stderr, flush=True)


def summary(prog: QtraceProgram, vm: TracedVm, started: float, stopped_by: str, seen: int,
            steps: list[dict] | None = None) -> dict:
    """Per-vCPU/per-phase counts read from the BPF maps (not from the event stream)."""
    def rows(spec: maps.CounterMap):
        items = prog.maps.items(spec.name)
        return [(row, n) for vm_id, row, n in spec.rows(items, prog.catalog) if vm_id == vm.vm_id]

    writes = [{**row, "count": n} for row, n in rows(maps.WRITES)]
    unexpected: dict[str, int] = defaultdict(int)
    for w in writes:
        if prog.catalog.unexpected(w["ioctl"], w["phase"]):
            unexpected[w["ioctl"]] += w["count"]
    errors = {row["ioctl"]: n for row, n in rows(maps.ERRORS)}
    lifecycle = {row["event"]: n for row, n in rows(maps.LIFECYCLE)}
    resets, following = {}, {}
    for row, n in rows(maps.RESETS):
        (following if row["following_host"] else resets)[row["cause"]] = n
    writes.sort(key=lambda r: (r["vcpu"] if r["vcpu"] is not None else -1, r["phase"], r["ioctl"]))
    return {
        "kind": "summary",
        "vm": vm.name,
        "pid": vm.pid,
        "duration": round(time.monotonic() - started, 3),
        "stopped_by": stopped_by,
        "kernel_hook": prog.hook_mode,
        "writes": writes,
        "errors": errors,
        "lifecycle": lifecycle,
        "resets": resets,
        "resets_following_host": following,
        "unexpected": dict(unexpected),
        "steps": steps or [],
        "events": seen,
        "events_lost": sum(prog.maps.events_lost().values()),
        "probes_attached": {a.probe.event: a.function for a in vm.plan.attached if a.ok},
        "probes_missing": {a.probe.event: a.reason for a in vm.plan.missing},
    }


def render_summary(s: dict) -> str:
    lines = [f"summary: vm {s['vm']} pid {s['pid']}, {s['duration']} s, stopped by "
             f"{s['stopped_by']}, {s['events']} events, {s['events_lost']} lost"]
    table: dict[tuple, dict[str, int]] = defaultdict(dict)
    for r in s["writes"]:
        table[(r["vcpu"], r["phase"])][r["ioctl"]] = r["count"]
    for (vcpu, phase), counts in sorted(table.items(), key=lambda kv: (
            kv[0][0] if kv[0][0] is not None else -1, kv[0][1])):
        who = f"vcpu {vcpu}" if vcpu is not None else "vm"
        body = ", ".join(f"{name.removeprefix('KVM_')}={n}" for name, n in sorted(counts.items()))
        lines.append(f"  {who:<7} {phase:<10} {body}")
    if s["resets"]:
        lines.append("  resets: " + ", ".join(f"{c}={n}" for c, n in s["resets"].items()))
    if s["errors"]:
        lines.append("  failed ioctls: " + ", ".join(f"{c}={n}" for c, n in s["errors"].items()))
    if s["unexpected"]:
        lines.append("  UNEXPECTED writes: " + ", ".join(
            f"{c}={n}" for c, n in s["unexpected"].items()))
    for st in s["steps"]:
        lines.append(f"  {st['step']} took {st['seconds'] * 1000:.3f} ms")
    return "\n".join(lines)


def run_watch(pid: int, *, as_json: bool, duration: float | None, hook: str | None = None,
              debug_roots: tuple[str, ...] = DEFAULT_DEBUG_ROOTS,
              out: Callable[[str], None] | None = None,
              show: EventFilter | None = None) -> int:
    started = time.monotonic()
    emit = out or (lambda line: print(line, flush=True))
    catalog = load_catalog()
    # Bad pids and unusable binaries are reported before anything is compiled.
    target = targets.open_target(pid)
    debuginfod = Debuginfod.from_env()
    # the file is opened once: checked as trusted, parsed and later attached through that fd
    opener = QemuBinaries(catalog, lambda _plan: None, debug_roots, debuginfod)
    binary = opener.open(target.exe_path, target.exe, pid)
    try:
        res = opener.resolve(binary)
    except BaseException:
        binary.close()
        raise
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        log_stderr(f"pid {pid}: exited before tracing started")
        return 1

    stop = {"reason": ""}

    # Signals set a flag the loop checks.  Not KeyboardInterrupt: a signal that lands while
    # Python runs inside BCC's ring-buffer ctypes callback raises there, and ctypes prints
    # and swallows exceptions from callbacks, so the interrupt would be lost.
    def on_signal(sig, _frame):
        stop["reason"] = signal.Signals(sig).name

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM,
                                                                    signal.SIGINT)}
    prog = None
    try:
        prog = QtraceProgram(catalog, hook=hook, log=log_stderr, write_events=True)
        bins = QemuBinaries(catalog, prog.attach_binary, debug_roots, debuginfod)
        bins.get(target.exe_path, target.exe, pid, opened=(binary, res))
        tracker = Tracker(prog.maps, bins, max_vms=1, grace=0)
        vm = tracker.adopt(pid, "scan", target=target)
        if vm is None:
            log_stderr(f"pid {pid}: exited before tracing started")
            return 1
        decoder = Decoder(catalog, lambda _id, p: vm.name if p == pid else f"pid-{p}",
                          lambda _id: vm.plan.functions)
        for a in vm.plan.missing:
            log_stderr(f"probe {a.probe.event}: missing: {a.reason}")
        for a in vm.plan.attached:
            for note in a.notes:
                log_stderr(f"probe {a.probe.event}: {note}")
        n_ok = len(vm.plan.attached) - len(vm.plan.missing)
        fds = vm.vcpu_fds
        log_stderr(f"attached to vm {vm.name} (pid {pid}, QEMU {vm.qemu_version or '?'}): "
                   f"{n_ok}/{len(vm.plan.attached)} probes, {prog.uprobe_count} uprobes, "
                   f"kernel hook {prog.hook_mode}, {len(fds)} vCPUs known, "
                   f"phase {'boot' if not fds else 'runtime'}, in "
                   f"{time.monotonic() - started:.2f}s"
                   + (f"; showing only {show.describe()}" if show and show.describe() else ""))
        seen = 0
        steps: list[dict] = []

        def flush() -> None:
            nonlocal seen
            while prog.events:
                raw = prog.events.popleft()
                if raw.vm != vm.vm_id:
                    continue
                seen += 1
                ev = decoder.decode(raw)
                if ev["kind"] == "step":
                    steps.append({"step": ev["step"], "seconds": ev["seconds"]})
                if show is None or show(ev):
                    emit(json.dumps(ev) if as_json else render(ev))

        deadline = started + duration if duration else None
        while not stop["reason"]:
            prog.poll(100)
            flush()
            if select.select([pidfd], [], [], 0)[0]:
                stop["reason"] = "target exit"
            elif deadline and time.monotonic() >= deadline:
                stop["reason"] = "duration"
        prog.drain()
        flush()
        s = summary(prog, vm, started, stop["reason"], seen, steps)
        emit(json.dumps(s) if as_json else render_summary(s))
        return 0
    finally:
        # Detach first, with our handlers still in place: a second Ctrl-C must not
        # interrupt the detaching.
        if prog is not None:
            prog.close()
        os.close(pidfd)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
