"""QtraceProgram: one BPF object from compile to close.

Compiles probes/qtrace.bpf.c with BCC, picks the kernel hook (fentry -> kprobe -> syscall
tracepoints, each refusal kept with its reason), attaches QEMU binaries' uprobes by file
through pinnable BPF links, and hands out its maps (`maps`, a VmMaps).  Every step that
succeeds pushes its undo; close() runs them in reverse, so every exit path (Ctrl-C,
SIGTERM, target exit, exception) detaches everything.  All calls into BCC stay here.
"""

from __future__ import annotations

import ctypes as ct
import os
from collections import deque
from collections.abc import Callable

from . import bpfsys, hooks, loading, maps, perf_events, preflight
from .binaries import AttachPlan
from .catalog import Catalog, bpf_source
from .errors import AttachError, QtraceError
from .kvm_ioctls import STATE_WRITES
from .pins import PinDir
from .vmmaps import VmMaps

Log = Callable[..., None]  # log(msg, level="info", **fields)


class QtraceProgram:
    """The BPF program for every traced QEMU binary and process.

    discovery: the kernel tracks QEMU processes from their exec (daemon).
    write_events: every state write is also a ring-buffer event (watch); otherwise the
    ring buffer carries exec/exit/lifecycle only and counts live in maps.
    pins: maps and links pinned there outlive this process (daemon).
    """

    def __init__(self, catalog: Catalog, *, hook: str | None = None, log: Log | None = None,
                 discovery: bool = False, write_events: bool = False, max_vms: int = 1024,
                 max_vcpus: int = 64, pins: PinDir | None = None):
        preflight.check_privileges()
        self.bcc = preflight.import_bcc()
        preflight.check_kernel_headers()
        self.catalog = catalog
        self.log = log or (lambda _msg, **_kw: None)
        self.discovery = discovery
        self.write_events = write_events
        self.max_vms, self.max_vcpus = max_vms, max_vcpus
        self.pins = pins
        self.refusals: dict[str, str] = {}
        self._failures: list[str] = []  # raw load errors, for resource_problem()
        self.hook_mode = ""
        self.events: deque = deque()  # ring-buffer events (struct event copies), oldest first
        self.uprobe_count = 0
        self.state = "closed"
        self._undo: list[Callable[[], None]] = []
        self.bpf = None
        self.maps: VmMaps | None = None
        try:
            self._open(hook)
            self._configure()
        except BaseException:
            self.close(keep_pins=True)  # a failed start must not throw away pinned counts
            raise
        self.state = "attached"

    def __enter__(self) -> QtraceProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _expect(self, *states: str) -> None:
        if self.state not in states:
            raise QtraceError(f"BPF program is {self.state}, expected {' or '.join(states)}")

    # -- compile and hook ------------------------------------------------------------

    def _open(self, preference: str | None) -> None:
        text = bpf_source()
        for mode in hooks.order(preference):
            check = hooks.precheck(mode)
            if not check.usable:
                self.refusals[mode] = check.reason
                continue
            for attempt in range(1, loading.LOAD_ATTEMPTS + 1):
                with loading.CapturedStderr() as captured, loading.signals_held():
                    try:
                        self._compile_and_hook(text, mode)
                        self.hook_mode = mode
                    except Exception as exc:  # BCC raises plain Exception on load failures
                        failure = str(exc).strip().splitlines()[-1]
                    else:
                        failure = ""
                if not loading.transient(failure + captured.text) or \
                        attempt == loading.LOAD_ATTEMPTS:
                    break
                # a signal that landed during the verifier's run: not a refusal
                self.log("BPF load interrupted, retrying", level="warning", hook=mode,
                         attempt=attempt, error=failure)
            if failure:
                self._failures.append(failure + captured.text)
                self.refusals[mode] = loading.refusal(mode, failure, captured.text)
                continue
            for refused, why in self.refusals.items():
                self.log("kernel hook refused", hook=refused, reason=why)
            self.log("kernel hook chosen", hook=mode)
            self._log_replaced(0)
            return
        detail = "; ".join(f"{m}: {r}" for m, r in self.refusals.items())
        problems = [p for p in map(preflight.resource_problem, self._failures) if p]
        if problems:
            raise QtraceError(f"cannot load the BPF program: {problems[0]} ({detail})")
        raise QtraceError(f"no usable kernel hook on KVM ioctls ({detail})")

    def cflags(self, mode: str) -> list[str]:
        return loading.cflags(mode, discovery=self.discovery, write_events=self.write_events,
                              max_vms=self.max_vms, max_vcpus=self.max_vcpus,
                              pin_dir=self.pins.path if self.pins else None)

    def _compile_and_hook(self, text: str, mode: str) -> None:
        BPF = self.bcc.BPF
        if mode == "fentry":
            # Cheap question first: a refused fentry would otherwise cost a full compile.
            BPF(text=bpf_source("fentry_check.bpf.c").encode()).cleanup()
        b = BPF(text=text.encode(), cflags=self.cflags(mode))  # fentry: auto-attached here
        self.bpf = b
        self._undo.append(b.cleanup)  # BCC detaches what it attached, then closes the fds
        done = len(self._undo)
        try:
            tracepoints = [("sched", "sched_process_exec", "tp_sched_exec"),
                           ("sched", "sched_process_exit", "tp_sched_exit")] \
                if self.discovery else []
            if mode == "tracepoint":
                tracepoints += [("syscalls", "sys_enter_ioctl", "tp_enter_ioctl"),
                                ("syscalls", "sys_exit_ioctl", "tp_exit_ioctl")]
            for category, name, fn in tracepoints:
                self._attach_link(fn, BPF.TRACEPOINT, f"tp-{name}",
                                  lambda c=category, n=name: perf_events.tracepoint_event(c, n))
            if mode == "kprobe":  # (fentry and kprobe attachments are not pinned)
                for fn in hooks.KVM_FUNCS:
                    b.attach_kprobe(event=fn, fn_name="kp_kvm_ioctl")
                    b.attach_kretprobe(event=fn, fn_name="kretp_kvm_ioctl")
        except BaseException:
            while len(self._undo) >= done:
                self._undo.pop()()
            self.bpf = None
            raise
        self.maps = VmMaps(b)
        self.state = "built"

    def _attach_link(self, fn_name: str, prog_type: int, pin_name: str,
                     open_event: Callable[[], int]) -> bool:
        """Hold fn_name on a perf event through a BPF link, pinned when pins are on (an
        identical program's pin is adopted as it is).  True when a new link was made."""
        fn = self.bpf.load_func(fn_name.encode(), prog_type)
        kept = self.pins.adopt(pin_name, fn.fd) if self.pins else None
        if kept is not None:
            self._hold(kept)
            return False
        perf = open_event()
        try:
            fd = bpfsys.link(fn.fd, perf)
        finally:
            os.close(perf)
        self._hold(fd)
        if self.pins:
            self.pins.pin(fd, pin_name)
        return True

    def _hold(self, fd: int) -> None:
        self._undo.append(lambda: os.close(fd))

    def _configure(self) -> None:
        b = self.bpf
        cfg = b[maps.PROBE_CFG]
        for probe in self.catalog.probes:
            val = cfg.Leaf()
            val.action = probe.action_id
            cfg[ct.c_int(probe.slot)] = val
        watched = b[maps.WATCHED]
        for number in STATE_WRITES:
            watched[ct.c_uint32(number)] = ct.c_uint32(1)
        table = b[maps.EVENTS]
        pending = self.events

        def on_event(_ctx, data, size):
            ev = table.event(data)  # the layout BCC recorded for struct event
            pending.append(type(ev).from_buffer_copy(ct.string_at(data, ct.sizeof(ev))))
            return 0

        table.open_ring_buffer(on_event)

    # -- uprobes -----------------------------------------------------------------------

    def attach_binary(self, plan: AttachPlan) -> None:
        """Every uprobe of the plan, or none: a failure undoes this binary's attaches.
        Links are named by the file (device, inode), offset and slot: a restarted daemon
        finds its predecessor's and keeps them."""
        self._expect("attached")
        mark = len(self._undo)
        made: list[str] = []
        dev, ino = plan.key
        uprobes = plan.uprobes()
        replaced = len(self.pins.replaced) if self.pins else 0
        try:
            for offset, slot, kind in uprobes:
                pin_name = f"u-{dev}-{ino}-{offset:x}-{slot}-{kind}"
                if self._attach_link(f"qt_{kind}_{slot}", self.bcc.BPF.KPROBE, pin_name,
                                     lambda o=offset, r=(kind == "return"):
                                     perf_events.uprobe_event(plan.path, o, r)):
                    made.append(pin_name)
        except AttachError as exc:
            self._undo_to(mark, made)
            exc.args = (f"{plan.display}: {exc}",)
            raise
        except BaseException:
            self._undo_to(mark, made)
            raise
        self.uprobe_count += len(uprobes)
        self._log_replaced(replaced)

    def _log_replaced(self, since: int) -> None:
        for pin_name in (self.pins.replaced[since:] if self.pins else []):
            self.log("pinned program differs from this one: replaced", level="warning",
                     link=pin_name)

    def _undo_to(self, mark: int, made_pins: list[str]) -> None:
        while len(self._undo) > mark:
            self._undo.pop()()
        for pin_name in made_pins:
            if self.pins:
                self.pins.unpin(pin_name)

    # -- reading -----------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> None:
        self.bpf.ring_buffer_consume()

    def close(self, keep_pins: bool = False) -> None:
        """Undo everything, last step first; safe to call twice.  keep_pins: pinned maps and
        links stay (a restart continues from them); otherwise they are removed too."""
        while self._undo:
            self._undo.pop()()
        self.bpf = None
        self.maps = None
        self.state = "closed"
        if self.pins and not keep_pins:
            self.pins.remove()
