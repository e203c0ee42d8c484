"""QtraceProgram: one BPF object from compile to close, in this process (BCC).

Compiles probes/qtrace.bpf.c with BCC, picks the kernel hook (fentry -> kprobe -> syscall
tracepoints, each refusal kept with its reason), holds the hook's and each QEMU binary's
attachments (attachments.py), and hands out its maps (`maps`, a VmMaps) and ring-buffer
events.  Every step that succeeds pushes its undo; close() runs them in reverse, so every
exit path (Ctrl-C, SIGTERM, target exit, exception) detaches everything.  Used by watch,
doctor and the loader; the daemon opens what the loader pinned (pinned.py) instead.
"""

from __future__ import annotations

import ctypes as ct
import os
import time

from qtrace_bpf.bpf import bpfsys, fentry
from qtrace_bpf.bpf.pins import PinDir
from qtrace_bpf.contract import abi, maps
from qtrace_bpf.contract.catalog import Catalog, bpf_source
from qtrace_bpf.contract.kvm_ioctls import STATE_WRITES
from qtrace_bpf.errors import QtraceError
from qtrace_bpf.log import Log, null_log
from qtrace_bpf.program import bcc_compile, kernel_hook, preflight
from qtrace_bpf.program.attachments import Attachments
from qtrace_bpf.program.running import RunningProgram
from qtrace_bpf.program.vm_maps import VmMaps


class QtraceProgram(RunningProgram):
    """The BPF program for every traced QEMU binary and process.

    discovery: the kernel tracks QEMU processes from their exec (daemon).
    write_events: every state write, lifecycle hit and step is also a ring-buffer event
    (watch's live view); otherwise the ring buffer carries exec/exit only (the daemon's
    discovery) and everything else is counted in maps.
    pins: maps and links pinned there outlive this process (the loader).
    """

    def __init__(self, catalog: Catalog, *, hook: str | None = None, log: Log | None = None,
                 discovery: bool = False, write_events: bool = False, max_vms: int = 1024,
                 max_vcpus: int = 64, pins: PinDir | None = None):
        super().__init__()
        preflight.check_privileges()
        self.bcc = preflight.import_bcc()
        self.bcc_version = getattr(self.bcc, "__version__", "")
        preflight.check_kernel_headers()
        self.catalog = catalog
        self.log = log or null_log
        self.discovery = discovery
        self.write_events = write_events
        self.max_vms, self.max_vcpus = max_vms, max_vcpus
        self.pins = pins
        self.refusals: dict[str, str] = {}
        self._failures: list[str] = []  # raw load errors, for resource_problem()
        self.hook_mode = ""
        self.hook_links: list[str] = []  # pin names of the kernel hook's and discovery's links
        self.bpf = None
        self._fentry_fds: dict[str, int] = {}  # fentry programs loaded here, not by BCC
        self.maps: VmMaps | None = None
        self.uprobes = bcc_compile.uprobe_mode()  # how uprobe handlers are loaded and attached
        self.links = Attachments(self.prog_fd, pins, self.log, self.uprobes == "multi")
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

    # -- compile and hook ------------------------------------------------------------

    def _open(self, preference: str | None) -> None:
        text = bpf_source()
        fresh = self.pins is not None and not self.pins.carried
        for mode in kernel_hook.order(preference):
            check = kernel_hook.precheck(mode)
            if not check.usable:
                self.refusals[mode] = check.reason
                continue
            for attempt in range(1, bcc_compile.LOAD_ATTEMPTS + 1):
                with bcc_compile.CapturedStderr() as captured, bcc_compile.signals_held():
                    try:
                        self._compile_and_hook(text, mode)
                        self.hook_mode = mode
                    except Exception as exc:  # BCC raises plain Exception on load failures
                        failure = str(exc).strip().splitlines()[-1]
                    else:
                        failure = ""
                if not bcc_compile.transient(failure + captured.text) or \
                        attempt == bcc_compile.LOAD_ATTEMPTS:
                    break
                # a signal that landed during the verifier's run: not a refusal
                self.log("BPF load interrupted, retrying", level="warning", hook=mode,
                         attempt=attempt, error=failure)
            if failure:
                if fresh:  # this attempt's maps: the next one makes its own
                    self.pins.clear_maps()
                self._failures.append(failure + captured.text)
                self.refusals[mode] = bcc_compile.refusal(mode, failure, captured.text)
                continue
            for refused, why in self.refusals.items():
                self.log("kernel hook refused", hook=refused, reason=why)
            self.log("kernel hook chosen", hook=mode)
            self.links.log_replaced()
            return
        detail = "; ".join(f"{m}: {r}" for m, r in self.refusals.items())
        problems = [p for p in map(preflight.resource_problem, self._failures) if p]
        if problems:
            raise QtraceError(f"cannot load the BPF program: {problems[0]} ({detail})")
        raise QtraceError(f"no usable kernel hook on KVM ioctls ({detail})")

    def cflags(self, mode: str) -> list[str]:
        return bcc_compile.cflags(mode, discovery=self.discovery, write_events=self.write_events,
                              max_vms=self.max_vms, max_vcpus=self.max_vcpus,
                              pin_dir=self.pins.path if self.pins else None)

    def _compile_and_hook(self, text: str, mode: str) -> None:
        BPF = self.bcc.BPF
        if mode == "fentry":
            # Cheap question first: a refused fentry would otherwise cost a full compile.
            check = BPF(text=bpf_source("fentry_check.bpf.c").encode())
            try:
                os.close(fentry.load(check.dump_func(b"fe_check"), "qt_fe_check", False,
                                     kernel_hook.KVM_FUNCS[0]))
            finally:
                check.cleanup()
        b = BPF(text=text.encode(), cflags=self.cflags(mode))
        self.bpf = b
        try:
            tracepoints = [("sched", "sched_process_exec", "tp_sched_exec"),
                           ("sched", "sched_process_exit", "tp_sched_exit")] \
                if self.discovery else []
            if mode == "tracepoint":
                tracepoints += [("syscalls", "sys_enter_ioctl", "tp_enter_ioctl"),
                                ("syscalls", "sys_exit_ioctl", "tp_exit_ioctl")]
            for category, name, fn in tracepoints:
                self.links.tracepoint(fn, category, name)
                self.hook_links.append(f"tp-{name}")
            if mode == "kprobe":
                for fn in kernel_hook.KVM_FUNCS:
                    self.links.kprobe("kp_kvm_ioctl", fn, False)
                    self.links.kprobe("kretp_kvm_ioctl", fn, True)
                    self.hook_links += [f"k-{fn}", f"kr-{fn}"]
            if mode == "fentry":
                self._fentry(b)
        except BaseException:
            self.links.close()
            self._close_fentry()
            b.cleanup()
            self.bpf = None
            raise
        self.maps = VmMaps(self._map)
        self.state = "built"

    def _fentry(self, b) -> None:
        """Load the fentry/fexit programs against KVM's BTF (fentry.py) and link them;
        pinned as f-<program> when pins are on, so they outlive this process."""
        for fn in kernel_hook.KVM_FUNCS:
            for exit_, kind in ((False, "fe"), (True, "fx")):
                name = f"{kind}_{fn}"
                short = f"qt_{kind}_{fn.split('_')[1]}"  # qt_fe_vcpu: the kernel's name
                self._fentry_fds[name] = fentry.load(b.dump_func(name.encode()), short,
                                                     exit_, fn)
                self.links.link_with(name, f"f-{name}",
                                     lambda fd, e=exit_, f=fn: self._live_link(fd, e, f))
                self.hook_links.append(f"f-{name}")

    def _live_link(self, prog_fd: int, exit_: bool, function: str) -> int:
        """A fentry/fexit link whose trampoline ftrace really calls.  On Debian 13's 6.12
        (under TCG) a link was seen attached while enabled_functions did not list its
        function: the hook never ran and KVM_CREATE_VCPU went uncounted.  Link again."""
        for attempt in range(1, 4):
            link = fentry.link(prog_fd, exit_)
            if kernel_hook.ftrace_calls(function) is not False:
                return link
            os.close(link)
            self.log("fentry link not live in ftrace, linking again", level="warning",
                     function=function, attempt=attempt)
            time.sleep(0.2)
        raise QtraceError(f"fentry on {function}: linked 3 times, but ftrace never listed its "
                          "trampoline in enabled_functions")

    def _close_fentry(self) -> None:
        while self._fentry_fds:
            os.close(self._fentry_fds.popitem()[1])

    def prog_fd(self, name: str) -> int:
        """The fd of a handler of the compiled program (loaded on first use)."""
        if name in self._fentry_fds:
            return self._fentry_fds[name]
        kind = self.bcc.BPF.TRACEPOINT if name.startswith("tp_") else self.bcc.BPF.KPROBE
        multi = self.uprobes == "multi" and name.startswith("qt_")
        return self.bpf.load_func(name.encode(), kind, None,
                                  bpfsys.BPF_TRACE_UPROBE_MULTI if multi else -1).fd

    def _map(self, name: str) -> bpfsys.Map:
        key, value = maps.TYPES[name]
        return bpfsys.Map(self.bpf[name].map_fd, abi.ctype(key), abi.ctype(value), name)

    def _configure(self) -> None:
        cfg = self._map(maps.PROBE_CFG)
        for probe in self.catalog.probes:
            val = cfg.Leaf()
            val.action = probe.action_id
            cfg[ct.c_int(probe.slot)] = val
        watched = self._map(maps.WATCHED)
        for number in STATE_WRITES:
            watched[ct.c_uint32(number)] = ct.c_uint32(1)
        self._read_events(self.bpf[maps.EVENTS].map_fd)

    def close(self, keep_pins: bool = False) -> None:
        """Undo everything, last step first; safe to call twice.  keep_pins: pinned maps and
        links stay (a restart continues from them); otherwise they are removed too."""
        self._stop_events()
        self.links.close()
        self._close_fentry()
        if self.bpf is not None:
            self.bpf.cleanup()  # BCC detaches what it attached, then closes the fds
        self.bpf = None
        self.maps = None
        self.state = "closed"
        if self.pins and not keep_pins:
            self.pins.remove()
