"""The BPF session: compile, pick the kernel hook, attach uprobes, track pids, detach.

Every attach is recorded on the BCC object, so `close()` undoes all of it; callers use
`with Session(...)` so that Ctrl-C, SIGTERM, target exit and exceptions all detach.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import hooks
from .catalog import Catalog, Probe, absent_in, bpf_source
from .elfsym import Resolution, Symbol
from .errors import QtraceError
from .kvm_ioctls import STATE_WRITES

Log = Callable[[str], None]


def _import_bcc():
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError:
        raise QtraceError(
            "BCC is not installed for this Python: apt-get install python3-bpfcc bpfcc-tools "
            "(Debian's package; the PyPI package named 'bcc' is unrelated), and use a venv "
            "made with --system-site-packages (scripts/setup.sh does both)") from None
    return bcc


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise QtraceError("permission denied: loading BPF programs needs root (or CAP_BPF, "
                          "CAP_PERFMON and CAP_SYS_PTRACE)")


def check_kernel_headers() -> None:
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(build):
        raise QtraceError(f"kernel headers missing: {build} does not exist (BCC compiles against "
                          "them: apt-get install linux-headers-amd64 and link it, see "
                          "scripts/setup.sh)")


@dataclass
class Attached:
    """One catalog probe as attached (or why not)."""

    probe: Probe
    symbol: Symbol | None
    function: str | None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    inlined_offsets: list[int] = field(default_factory=list)  # extra entry probes

    @property
    def ok(self) -> bool:
        return self.symbol is not None or bool(self.inlined_offsets)


@dataclass
class BinaryPlan:
    key: str
    path: str
    resolution: Resolution
    attached: list[Attached] = field(default_factory=list)

    @property
    def missing(self) -> list[Attached]:
        return [a for a in self.attached if not a.ok]


def plan_probes(catalog: Catalog, res: Resolution) -> list[Attached]:
    """catalog x symbols = attach points; anything that does not resolve says why."""
    out = []
    for probe in catalog.probes:
        chosen: Attached | None = None
        reasons = []
        for fn in probe.functions:
            syms = res.found.get(fn)
            inlined = res.inlined_offsets(fn) if probe.attach_inlined else []
            if not syms and inlined:
                chosen = Attached(probe, None, fn, inlined_offsets=inlined, notes=[
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
            if sym.is_clone:
                notes.append(f"GCC clone {sym.name}")
            if inlined:
                notes.append(f"{fn} is also inlined at {len(inlined)} site(s): probed too")
            elif fn in probe.inlined or res.inlined.get(fn):
                notes.append(f"{fn} is inlined at some call sites: those calls are not seen")
            if fn != probe.functions[0]:
                notes.append(f"fallback for {probe.functions[0]} ({reasons[0]})")
            chosen = Attached(probe, sym, fn, notes=notes, inlined_offsets=inlined)
            break
        if chosen is None and absent_in(probe, res.qemu_version):
            reasons = [f"{probe.functions[0]}: not in QEMU {res.qemu_version} "
                       f"(exists since {probe.since})"]
        out.append(chosen or Attached(probe, None, None, reason="; ".join(reasons)))
    return out


def attach_uprobe_at(bpf, path: str, offset: int, fn_name: str, retprobe: bool = False) -> None:
    """Attach at a file offset we resolved (BCC's attach_uprobe would re-resolve a vaddr).

    Registered on the BCC object like its own attaches, so bpf.cleanup() detaches it.
    """
    import bcc  # type: ignore[import-not-found]

    fn = bpf.load_func(fn_name.encode(), bcc.BPF.KPROBE)
    tag = re.sub(r"[^A-Za-z0-9_]", "_", path)[-40:]
    ev_name = f"{'r' if retprobe else 'p'}_qtrace_{os.getpid()}{tag}_0x{offset:x}".encode()
    fd = bcc.libbcc.lib.bpf_attach_uprobe(fn.fd, 1 if retprobe else 0, ev_name, path.encode(),
                                          offset, -1)
    if fd < 0:
        raise QtraceError(f"failed to attach {'uretprobe' if retprobe else 'uprobe'} at "
                          f"{path}+{offset:#x}: {os.strerror(ct.get_errno() or 1)}")
    bpf._add_uprobe_fd(ev_name, fd)


class _CapturedStderr:
    """libbcc prints load errors on fd 2; keep them for the refusal reason instead."""

    def __enter__(self) -> _CapturedStderr:
        import tempfile

        self.text = ""
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()


def _refusal(mode: str, failure: str, bcc_stderr: str) -> str:
    lines = [ln.strip() for ln in bcc_stderr.splitlines() if ln.strip()]
    kernel = next((ln for ln in lines if ln.startswith("bpf:")), "")
    if "super-user" in failure and os.geteuid() == 0:
        failure = "the kernel refused to load the program although we are root"
    if "Failed to compile" in failure:
        errors = [ln for ln in lines if "error:" in ln][:2]
        return f"{mode} program does not compile here: {' / '.join(errors) or failure}"
    return f"{failure}" + (f" ({kernel})" if kernel else "")


class Session:
    """One BPF program for all traced QEMU binaries and pids."""

    def __init__(self, catalog: Catalog, *, hook: str | None = None, log: Log | None = None,
                 ringbuf_cb: Callable[[bytes], None] | None = None, discovery: bool = False):
        check_privileges()
        self.bcc = _import_bcc()
        check_kernel_headers()
        self.catalog = catalog
        self.log = log or (lambda _msg: None)
        self.refusals: dict[str, str] = {}
        self.binaries: dict[str, BinaryPlan] = {}
        self.tracked: set[int] = set()
        self.bpf = None
        self.hook_mode = ""
        self._ringbuf_cb = ringbuf_cb
        self.discovery = discovery
        try:
            self._open(hook)
            self._configure()
        except BaseException:
            self.close()
            raise

    # -- kernel hook ---------------------------------------------------------------

    def _open(self, preference: str | None) -> None:
        text = bpf_source()
        for mode in hooks.order(preference):
            check = hooks.precheck(mode)
            if not check.usable:
                self.refusals[mode] = check.reason
                continue
            with _CapturedStderr() as captured:
                try:
                    self.bpf = self._compile_and_hook(text, mode)
                    self.hook_mode = mode
                except Exception as exc:  # BCC raises plain Exception on load/attach failure
                    failure = str(exc).strip().splitlines()[-1]
                else:
                    failure = ""
            if failure:
                self.refusals[mode] = _refusal(mode, failure, captured.text)
                continue
            for refused, why in self.refusals.items():
                self.log(f"kernel hook {refused}: refused: {why}")
            self.log(f"kernel hook: {mode}")
            return
        detail = "; ".join(f"{m}: {r}" for m, r in self.refusals.items())
        raise QtraceError(f"no usable kernel hook on KVM ioctls ({detail})")

    def _compile_and_hook(self, text: str, mode: str):
        BPF = self.bcc.BPF
        if mode == "fentry":
            # Cheap question first: a refused fentry would otherwise cost a full compile.
            BPF(text=bpf_source("fentry_check.bpf.c").encode()).cleanup()
        cflags = [f"-DQTRACE_HOOK_{mode.upper()}", "-Wno-unused-function"]
        if self.discovery:
            cflags.append("-DQTRACE_DISCOVERY")
        b = BPF(text=text.encode(), cflags=cflags)  # fentry: KFUNC_PROBEs auto-attach here
        try:
            if self.discovery:
                b.attach_tracepoint(tp="sched:sched_process_exec", fn_name="tp_sched_exec")
                b.attach_tracepoint(tp="sched:sched_process_exit", fn_name="tp_sched_exit")
            if mode == "kprobe":
                for fn in hooks.KVM_FUNCS:
                    b.attach_kprobe(event=fn, fn_name="kp_kvm_ioctl")
                    b.attach_kretprobe(event=fn, fn_name="kretp_kvm_ioctl")
            elif mode == "tracepoint":
                b.attach_tracepoint(tp="syscalls:sys_enter_ioctl", fn_name="tp_enter_ioctl")
                b.attach_tracepoint(tp="syscalls:sys_exit_ioctl", fn_name="tp_exit_ioctl")
        except BaseException:
            b.cleanup()
            raise
        return b

    def _configure(self) -> None:
        b = self.bpf
        cfg = b["probe_cfg"]
        for probe in self.catalog.probes:
            val = cfg.Leaf()
            val.action = probe.action_id
            cfg[ct.c_int(probe.slot)] = val
        watched = b["watched"]
        for number in STATE_WRITES:
            watched[ct.c_uint32(number)] = ct.c_uint32(1)
        if self._ringbuf_cb is not None:
            cb = self._ringbuf_cb

            def _on_event(_ctx, data, size):
                cb(ct.string_at(data, size))
                return 0

            b["events"].open_ring_buffer(_on_event)

    # -- uprobes -------------------------------------------------------------------

    def _attach_uprobe(self, path: str, offset: int, fn_name: str, retprobe: bool) -> None:
        attach_uprobe_at(self.bpf, path, offset, fn_name, retprobe)

    def add_binary(self, key: str, path: str, res: Resolution) -> BinaryPlan:
        """Attach the catalog to one QEMU binary, once, for all its pids."""
        if key in self.binaries:
            return self.binaries[key]
        plan = BinaryPlan(key, path, res, plan_probes(self.catalog, res))
        for att in plan.attached:
            for offset in att.inlined_offsets:
                self._attach_uprobe(path, offset, f"qt_entry_{att.probe.slot}", False)
            if att.symbol is None:
                continue
            self._attach_uprobe(path, att.symbol.offset, f"qt_entry_{att.probe.slot}", False)
            if att.probe.has_return:
                self._attach_uprobe(path, att.symbol.offset, f"qt_return_{att.probe.slot}", True)
        self.binaries[key] = plan
        return plan

    # -- pids ----------------------------------------------------------------------

    def track(self, pid: int, *, boot_done: bool, vcpu_fds: dict[int, int]) -> None:
        b = self.bpf
        procs = b["procs"]
        st = procs.Leaf()
        st.boot_done = 1 if boot_done else 0
        st.windows = 0
        st.cause = 0
        fds = b["vcpu_fds"]
        for fd, vcpu in vcpu_fds.items():
            k = fds.Key()
            k.tgid = pid
            k.fd = fd
            fds[k] = ct.c_int32(vcpu)
        procs[ct.c_uint32(pid)] = st
        self.tracked.add(pid)

    def untrack(self, pid: int) -> None:
        try:
            del self.bpf["procs"][ct.c_uint32(pid)]
        except KeyError:
            pass
        self.tracked.discard(pid)

    def is_tracked_in_kernel(self, pid: int) -> bool:
        try:
            self.bpf["procs"][ct.c_uint32(pid)]
        except KeyError:
            return False
        return True

    def forget(self, pid: int) -> None:
        """Drop every counter of an exited process (its series end with it)."""
        self.untrack(pid)
        for name in ("write_counts", "error_counts", "lifecycle_counts", "reset_counts",
                     "last_val", "vcpu_fds"):
            table = self.bpf[name]
            for key in [k for k in table.keys() if k.tgid == pid]:
                try:
                    del table[key]
                except KeyError:
                    pass

    # -- reading -------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> None:
        self.bpf.ring_buffer_consume()

    def table_items(self, name: str) -> list[tuple[object, int]]:
        return [(k, v.value) for k, v in self.bpf[name].items()]

    def events_lost(self) -> int:
        return int(self.bpf["stats"][ct.c_int(0)].value)

    def attached_count(self) -> int:
        return len(self.bpf.uprobe_fds) if self.bpf else 0

    def close(self) -> None:
        if self.bpf is not None:
            b, self.bpf = self.bpf, None
            b.cleanup()

