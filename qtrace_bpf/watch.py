"""`qprobe watch PID`: trace one QEMU process until duration, signal, or its exit."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import elfsym, targets
from .catalog import Catalog, load_catalog
from .events import FOLLOWUP_FLAG, Decoder, phase_name, render
from .kvm_ioctls import ioctl_name
from .qemu_abi import cause_name
from .session import BinaryPlan, Session
from .targets import Target


def log_stderr(msg: str) -> None:
    print(f"qprobe: {msg}", file=sys.stderr, flush=True)


@dataclass
class Watch:
    """Everything one watch run needs, built in data-flow order."""

    target: Target
    catalog: Catalog
    session: Session
    plan: BinaryPlan
    decoder: Decoder
    events_seen: int = 0
    stop_reason: str = ""
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def resolve_target(target: Target, catalog: Catalog, debug_roots: tuple[str, ...]) \
        -> elfsym.Resolution:
    names = [fn for p in catalog.probes for fn in p.functions]
    return elfsym.resolve_cached(target.exe_path, names, display=target.exe.removesuffix(
        " (deleted)"), debug_roots=debug_roots, inline_names=names)


def summary(w: Watch, started: float) -> dict:
    """Per-vCPU/per-phase counts read from the BPF maps (not from the event stream)."""
    pid = w.target.pid
    version = w.plan.resolution.qemu_version
    writes = []
    for k, n in w.session.table_items("write_counts"):
        if k.tgid == pid:
            writes.append({"vcpu": k.vcpu if k.vcpu >= 0 else None, "phase": phase_name(k.phase),
                           "ioctl": ioctl_name(k.cmd), "count": n})
    writes.sort(key=lambda r: (r["vcpu"] if r["vcpu"] is not None else -1, r["phase"], r["ioctl"]))
    errors = {ioctl_name(k.cmd): n for k, n in w.session.table_items("error_counts")
              if k.tgid == pid}
    lifecycle = {w.catalog.by_slot(k.probe).event: n
                 for k, n in w.session.table_items("lifecycle_counts") if k.tgid == pid}
    resets: dict[str, int] = {}
    following: dict[str, int] = {}
    for k, n in w.session.table_items("reset_counts"):
        if k.tgid == pid:
            into = following if k.cause & FOLLOWUP_FLAG else resets
            into[cause_name(k.cause & ~FOLLOWUP_FLAG, version)] = n
    return {
        "kind": "summary",
        "vm": w.target.name,
        "pid": pid,
        "duration": round(time.monotonic() - started, 3),
        "stopped_by": w.stop_reason,
        "kernel_hook": w.session.hook_mode,
        "writes": writes,
        "errors": errors,
        "lifecycle": lifecycle,
        "resets": resets,
        "resets_following_host": following,
        "events": w.events_seen,
        "events_lost": w.session.events_lost(),
        "probes_attached": {a.probe.event: a.function for a in w.plan.attached if a.ok},
        "probes_missing": {a.probe.event: a.reason for a in w.plan.missing},
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
    return "\n".join(lines)


def run_watch(pid: int, *, as_json: bool, duration: float | None, hook: str | None = None,
              debug_roots: tuple[str, ...] = elfsym.DEFAULT_DEBUG_ROOTS,
              out: Callable[[str], None] | None = None) -> int:
    started = time.monotonic()
    emit = out or (lambda line: print(line, flush=True))
    catalog = load_catalog()
    target = targets.open_target(pid)
    res = resolve_target(target, catalog, debug_roots)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        log_stderr(f"pid {pid}: exited before tracing started")
        return 1

    pending: deque[bytes] = deque()
    stop = {"reason": ""}

    # Signals set a flag the loop checks.  Not KeyboardInterrupt: a signal that lands while
    # Python runs inside BCC's ring-buffer ctypes callback raises there, and ctypes prints
    # and swallows exceptions from callbacks, so the interrupt would be lost.
    def on_signal(sig, _frame):
        stop["reason"] = signal.Signals(sig).name

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM,
                                                                    signal.SIGINT)}
    session = None
    try:
        session = Session(catalog, hook=hook, log=log_stderr, ringbuf_cb=pending.append)
        plan = session.add_binary(res.build_id or target.exe, target.exe_path, res)
        fds = targets.vcpu_fds(pid)
        # A QEMU holding vCPU fds has created its machine: boot is over (or --preconfig
        # has not created it yet: then everything until machine creation is boot).
        session.track(pid, boot_done=bool(fds), vcpu_fds=fds)
        functions = {a.probe.slot: a.function for a in plan.attached if a.function}
        decoder = Decoder(catalog, {pid: target.name}, {pid: res.qemu_version}, functions)
        w = Watch(target, catalog, session, plan, decoder)
        for a in plan.missing:
            log_stderr(f"probe {a.probe.event}: missing: {a.reason}")
        for a in plan.attached:
            for note in a.notes:
                log_stderr(f"probe {a.probe.event}: {note}")
        n_ok = len(plan.attached) - len(plan.missing)
        log_stderr(f"attached to vm {target.name} (pid {pid}, QEMU {res.qemu_version or '?'}): "
                   f"{n_ok}/{len(plan.attached)} probes, {session.attached_count()} uprobes, "
                   f"kernel hook {session.hook_mode}, {len(fds)} vCPUs known, "
                   f"phase {'boot' if not fds else 'runtime'}, in "
                   f"{time.monotonic() - started:.2f}s")

        def flush() -> None:
            while pending:
                ev = decoder.decode(pending.popleft())
                if ev["pid"] != pid:
                    continue
                w.events_seen += 1
                emit(json.dumps(ev) if as_json else render(ev))

        deadline = started + duration if duration else None
        while not stop["reason"]:
            session.poll(100)
            flush()
            if select.select([pidfd], [], [], 0)[0]:
                stop["reason"] = "target exit"
            elif deadline and time.monotonic() >= deadline:
                stop["reason"] = "duration"
        session.drain()
        flush()
        w.stop_reason = stop["reason"]
        s = summary(w, started)
        emit(json.dumps(s) if as_json else render_summary(s))
        return 0
    finally:
        # Detach first, with our handlers still in place: a second Ctrl-C must not
        # interrupt the detaching.
        if session is not None:
            session.close()
        os.close(pidfd)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

