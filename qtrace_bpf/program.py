"""QtraceProgram: one BPF object from compile to close.

Compiles probes/qtrace.bpf.c with BCC, picks the kernel hook (fentry -> kprobe -> syscall
tracepoints, each refusal kept with its reason), attaches QEMU binaries' uprobes by file,
and offers typed access to the maps.  Every step that succeeds pushes its undo; close()
runs them in reverse, so every exit path (Ctrl-C, SIGTERM, target exit, exception)
detaches everything.  All calls into BCC internals stay in this module.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import os
import signal
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable

from . import abi, hooks, links
from .binaries import BinaryPlan
from .catalog import Catalog, bpf_source
from .errors import AttachError, QtraceError
from .kvm_ioctls import STATE_WRITES

Log = Callable[..., None]  # log(msg, level="info", **fields)
BPF_NOEXIST = 1


def import_bcc():
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError:
        raise QtraceError(
            "BCC is not installed for this Python: apt-get install python3-bpfcc bpfcc-tools "
            "(Debian's package; the PyPI package named 'bcc' is unrelated), and use a venv "
            "made with --system-site-packages (scripts/setup.sh does both)") from None
    return bcc


_CAPS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_PERFMON": 38, "CAP_BPF": 39}


def effective_caps() -> set[str]:
    try:
        with open("/proc/self/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return set()
    return {name for name, bit in _CAPS.items() if eff & (1 << bit)}


def check_privileges() -> None:
    """Root, or the capabilities the shipped unit grants: said by name when one is missing."""
    caps = effective_caps()
    if "CAP_SYS_ADMIN" in caps:
        return
    missing = [c for c in ("CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE") if c not in caps]
    if missing:
        who = "running as root but " if os.geteuid() == 0 else ""
        raise QtraceError(f"permission denied: {who}missing capability {', '.join(missing)} "
                          "(loading BPF programs needs root, or CAP_BPF, CAP_PERFMON and "
                          "CAP_SYS_PTRACE)")


def resource_problem(text: str) -> str | None:
    """A load that failed for want of a resource, named as such (not "does not compile")."""
    import resource

    if "Too many open files" in text:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (f"file-descriptor limit too low: {soft} open files (RLIMIT_NOFILE; the unit's "
                "LimitNOFILE=): loading the BPF program needs a few hundred")
    if "Cannot allocate memory" in text or "Operation not permitted" in text and \
            "memlock" in text.lower():
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return (f"locked-memory limit too low ({soft} bytes, RLIMIT_MEMLOCK; LimitMEMLOCK=) or "
                "the kernel is out of memory for BPF maps: raise it, or lower max_vms")
    return None


def kernel_headers_dir() -> str:
    return f"/lib/modules/{os.uname().release}/build"


def check_kernel_headers() -> None:
    build = kernel_headers_dir()
    if not os.path.exists(build):
        raise QtraceError(f"kernel headers missing: {build} does not exist (BCC compiles against "
                          "them: apt-get install linux-headers-amd64 and link it, see "
                          "scripts/setup.sh)")


class _CapturedStderr:
    """libbcc prints load errors on fd 2; keep them for the refusal reason instead."""

    def __enter__(self) -> _CapturedStderr:
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


_LOAD_ATTEMPTS = 4


@contextlib.contextmanager
def _signals_held():
    """Hold catchable signals while the verifier runs: one that lands mid-load makes the
    kernel answer EAGAIN, which must not read as "this kernel refuses the hook".  Held
    signals are delivered (and handled) right after."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
            signal.SIGCHLD, signal.SIGWINCH}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _transient(text: str) -> bool:
    """EAGAIN/EINTR from the kernel: a signal interrupted the load, try again."""
    return "Resource temporarily unavailable" in text or "Interrupted system call" in text


def _refusal(mode: str, failure: str, bcc_stderr: str) -> str:
    problem = resource_problem(failure + bcc_stderr)
    if problem:
        return f"{mode} program cannot load: {problem}"
    lines = [ln.strip() for ln in bcc_stderr.splitlines() if ln.strip()]
    kernel = next((ln for ln in lines if ln.startswith("bpf:")), "")
    if "super-user" in failure and os.geteuid() == 0:
        failure = "the kernel refused to load the program although we are root"
    if "Failed to compile" in failure:
        errors = [ln for ln in lines if "error:" in ln][:2]
        return f"{mode} program does not compile here: {' / '.join(errors) or failure}"
    return f"{failure}" + (f" ({kernel})" if kernel else "")


def cflags(mode: str, *, discovery: bool = True, write_events: bool = True,
           max_vms: int = 1024, max_vcpus: int = 64, pin_dir: str | None = None) -> list[str]:
    """How probes/qtrace.bpf.c is compiled for one kernel hook and one use."""
    flags = [f"-DQTRACE_HOOK_{mode.upper()}", f"-I{abi.include_dir()}",
             f"-DMAX_VMS={max_vms}", f"-DMAX_VCPUS={max_vcpus}", "-Wno-unused-function"]
    if pin_dir:
        flags.append(f'-DQTRACE_PIN_DIR="{pin_dir}/maps"')
    if discovery:
        flags.append("-DQTRACE_DISCOVERY")
    if write_events:
        flags.append("-DQTRACE_WRITE_EVENTS")
    return flags


class QtraceProgram:
    """The BPF program for every traced QEMU binary and process.

    discovery: the kernel tracks QEMU processes from their exec (daemon).
    write_events: every state write is also a ring-buffer event (watch); otherwise the
    ring buffer carries exec/exit/lifecycle only and counts live in maps.
    """

    def __init__(self, catalog: Catalog, *, hook: str | None = None, log: Log | None = None,
                 discovery: bool = False, write_events: bool = False, max_vms: int = 1024,
                 max_vcpus: int = 64, pin_dir: str | None = None):
        check_privileges()
        self.bcc = import_bcc()
        check_kernel_headers()
        self.catalog = catalog
        self.log = log or (lambda _msg, **_kw: None)
        self.discovery = discovery
        self.write_events = write_events
        self.max_vms, self.max_vcpus = max_vms, max_vcpus
        self.refusals: dict[str, str] = {}
        self._failures: list[str] = []  # raw load errors, for resource_problem()
        self.hook_mode = ""
        self.events: deque = deque()  # ring-buffer events (struct event copies), oldest first
        self.uprobe_count = 0
        self.state = "closed"
        self._undo: list[Callable[[], None]] = []
        self.bpf = None
        # Pins (daemon): maps and links under pin_dir outlive this process; a program
        # found there, identical to ours (same tag), is kept attached, another replaced.
        self.pin_dir = pin_dir
        self.carried = False  # counters of a previous daemon found pinned and continued
        self.kept: list[str] = []  # link pins adopted as they were
        self.replaced: list[str] = []  # link pins of another program, replaced
        self._claimed: set[str] = set()  # link pins this process holds
        if pin_dir:
            os.makedirs(os.path.join(pin_dir, "maps"), exist_ok=True)
            os.makedirs(os.path.join(pin_dir, "links"), exist_ok=True)
            self.carried = bool(os.listdir(os.path.join(pin_dir, "maps")))
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
            for attempt in range(1, _LOAD_ATTEMPTS + 1):
                with _CapturedStderr() as captured, _signals_held():
                    try:
                        self._compile_and_hook(text, mode)
                        self.hook_mode = mode
                    except Exception as exc:  # BCC raises plain Exception on load failures
                        failure = str(exc).strip().splitlines()[-1]
                    else:
                        failure = ""
                if not _transient(failure + captured.text) or attempt == _LOAD_ATTEMPTS:
                    break
                # a signal that landed during the verifier's run: not a refusal
                self.log("BPF load interrupted, retrying", level="warning", hook=mode,
                         attempt=attempt, error=failure)
            if failure:
                self._failures.append(failure + captured.text)
                self.refusals[mode] = _refusal(mode, failure, captured.text)
                continue
            for refused, why in self.refusals.items():
                self.log("kernel hook refused", hook=refused, reason=why)
            self.log("kernel hook chosen", hook=mode)
            self._log_replaced(0)
            return
        detail = "; ".join(f"{m}: {r}" for m, r in self.refusals.items())
        problems = [p for p in map(resource_problem, self._failures) if p]
        if problems:
            raise QtraceError(f"cannot load the BPF program: {problems[0]} ({detail})")
        raise QtraceError(f"no usable kernel hook on KVM ioctls ({detail})")

    def cflags(self, mode: str) -> list[str]:
        return cflags(mode, discovery=self.discovery, write_events=self.write_events,
                      max_vms=self.max_vms, max_vcpus=self.max_vcpus, pin_dir=self.pin_dir)

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
                self._attach_link(fn, self.bcc.BPF.TRACEPOINT, f"tp-{name}",
                                  lambda c=category, n=name: links.tracepoint_event(c, n))
            if mode == "kprobe":  # (fentry and kprobe attachments are not pinned)
                for fn in hooks.KVM_FUNCS:
                    b.attach_kprobe(event=fn, fn_name="kp_kvm_ioctl")
                    b.attach_kretprobe(event=fn, fn_name="kretp_kvm_ioctl")
        except BaseException:
            while len(self._undo) >= done:
                self._undo.pop()()
            self.bpf = None
            raise
        self.state = "built"

    def _attach_link(self, fn_name: str, prog_type: int, pin_name: str,
                     open_event: Callable[[], int]) -> bool:
        """Hold fn_name on a perf event through a BPF link, pinned when pins are on.  A pin
        already there holding the same program (same tag) is adopted as it is; one holding
        another program is replaced.  True when a new link was made."""
        fn = self.bpf.load_func(fn_name.encode(), prog_type)
        path = os.path.join(self.pin_dir, "links", pin_name) if self.pin_dir else None
        if path and os.path.exists(path):
            old = links.get_pinned(path)
            if old is not None and links.link_prog_tag(old) == links.prog_tag(fn.fd):
                self._hold(old)
                self._claimed.add(pin_name)
                self.kept.append(pin_name)
                return False
            if old is not None:
                os.close(old)
            os.unlink(path)  # another program: its attachment goes, ours takes its place
            self.replaced.append(pin_name)  # logged by _log_replaced (not under a capture)
        perf = open_event()
        try:
            fd = links.link(fn.fd, perf)
        finally:
            os.close(perf)
        self._hold(fd)
        if path:
            links.pin(fd, path)
            self._claimed.add(pin_name)
        return True

    def _hold(self, fd: int) -> None:
        self._undo.append(lambda: os.close(fd))

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
        table = b["events"]
        pending = self.events

        def on_event(_ctx, data, size):
            ev = table.event(data)  # the layout BCC recorded for struct event
            pending.append(type(ev).from_buffer_copy(ct.string_at(data, ct.sizeof(ev))))
            return 0

        table.open_ring_buffer(on_event)

    # -- uprobes -----------------------------------------------------------------------

    def attach_binary(self, plan: BinaryPlan) -> None:
        """Every uprobe of the plan, or none: a failure undoes this binary's attaches.
        Links are named by the file (device, inode), offset and slot: a restarted daemon
        finds its predecessor's and keeps them."""
        self._expect("attached")
        mark = len(self._undo)
        made: list[str] = []
        dev, ino = plan.key
        uprobes = plan.uprobes()
        replaced = len(self.replaced)
        try:
            for offset, slot, kind in uprobes:
                pin_name = f"u-{dev}-{ino}-{offset:x}-{slot}-{kind}"
                if self._attach_link(f"qt_{kind}_{slot}", self.bcc.BPF.KPROBE, pin_name,
                                     lambda o=offset, r=(kind == "return"):
                                     links.uprobe_event(plan.path, o, r)):
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
        for pin_name in self.replaced[since:]:
            self.log("pinned program differs from this one: replaced", level="warning",
                     link=pin_name)

    def _undo_to(self, mark: int, made_pins: list[str]) -> None:
        while len(self._undo) > mark:
            self._undo.pop()()
        for pin_name in made_pins:
            if self.pin_dir:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.pin_dir, "links", pin_name))
            self._claimed.discard(pin_name)

    def prune_links(self) -> list[str]:
        """Unpin the link pins nobody claimed since start (files no process runs from any
        more, catalog slots that changed): their uprobes go away."""
        if not self.pin_dir:
            return []
        gone = []
        for name in os.listdir(os.path.join(self.pin_dir, "links")):
            if name not in self._claimed:
                os.unlink(os.path.join(self.pin_dir, "links", name))
                gone.append(name)
        return gone

    # -- processes (map entries; the Tracker decides which) ------------------------------

    def proc(self, pid: int):
        """The kernel's proc_state for pid, or None when the kernel does not track it."""
        try:
            return self.bpf["procs"][ct.c_uint32(pid)]
        except KeyError:
            return None

    def insert_proc(self, pid: int, vm: int, *, boot_done: bool) -> bool:
        """Track pid as VM id `vm` unless the kernel already does (False then)."""
        table = self.bpf["procs"]
        leaf = table.Leaf()
        leaf.vm = vm
        leaf.boot_done = 1 if boot_done else 0
        key = ct.c_uint32(pid)
        rc = self.bcc.libbcc.lib.bpf_update_elem(table.map_fd, ct.byref(key), ct.byref(leaf),
                                                 BPF_NOEXIST)
        if rc < 0 and ct.get_errno() not in (0, 17):  # EEXIST: tracked meanwhile
            raise QtraceError(f"procs map: cannot track pid {pid}: {os.strerror(ct.get_errno())}"
                              " (map full? raise max_vms)")
        return rc == 0

    def set_boot_done(self, pid: int) -> None:
        table = self.bpf["procs"]
        key = ct.c_uint32(pid)
        try:
            leaf = table[key]
        except KeyError:
            return
        leaf.boot_done = 1
        table[key] = leaf

    def delete_proc(self, pid: int) -> None:
        try:
            del self.bpf["procs"][ct.c_uint32(pid)]
        except KeyError:
            pass

    def procs(self) -> dict[int, int]:
        """pid -> VM id, as the kernel tracks them now."""
        return {k.value: v.vm for k, v in self.bpf["procs"].items()}

    def set_vcpu_fds(self, vm: int, fds: dict[int, int]) -> None:
        table = self.bpf["vcpu_fds"]
        for fd, vcpu in fds.items():
            key = table.Key()
            key.vm = vm
            key.fd = fd
            table[key] = ct.c_int32(vcpu)

    def delete_vms(self, vms: Iterable[int]) -> int:
        """Delete every entry of these VM ids from every per-VM map; returns how many."""
        gone = set(vms)
        n = 0
        if not gone:
            return 0
        for name in abi.PER_VM_MAPS:
            table = self.bpf[name]
            for key in [k for k in table.keys() if k.vm in gone]:
                try:
                    del table[key]
                    n += 1
                except KeyError:
                    pass
        return n

    def vm_ids_with_vcpus(self) -> set[int]:
        """VM ids the kernel saw create a vCPU (or that were seeded with vCPU fds)."""
        return {k.vm for k in self.bpf["vcpu_fds"].keys()}

    def vm_ids_in_maps(self) -> set[int]:
        ids: set[int] = set()
        for name in abi.PER_VM_MAPS:
            ids |= {k.vm for k in self.bpf[name].keys()}
        return ids

    # -- reading -----------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> None:
        self.bpf.ring_buffer_consume()

    def items(self, name: str) -> list[tuple[object, int]]:
        """(key, count) of one counter map, read now: BPF_MAP_LOOKUP_BATCH, a few thousand
        entries a system call (BCC's items() makes two calls per key; its own batch reader
        allocates the map's whole max_entries)."""
        table = self.bpf[name]
        out: list[tuple[object, int]] = []
        chunk = 4096
        token_in, token_out = ct.create_string_buffer(64), ct.create_string_buffer(64)
        count = ct.c_uint32()
        lib = self.bcc.libbcc.lib
        first = True
        while True:
            # fresh arrays each round: the keys handed out point into them
            keys, vals = (table.Key * chunk)(), (table.Leaf * chunk)()
            count.value = chunk
            rc = lib.bpf_lookup_batch(table.map_fd, None if first else
                                      ct.cast(token_in, ct.POINTER(ct.c_uint32)),
                                      ct.cast(token_out, ct.POINTER(ct.c_uint32)),
                                      ct.byref(keys), ct.byref(vals), ct.byref(count))
            err = ct.get_errno()
            out += [(keys[i], vals[i]) for i in range(count.value)]  # u64 counters
            if rc != 0:
                if err == errno.ENOENT:
                    return out  # the whole map was read
                if first and err in (errno.EINVAL, errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP
                    return [(k, v.value) for k, v in table.items()]  # kernel without batch
                raise QtraceError(f"map {name}: lookup batch failed: {os.strerror(err)}")
            first = False
            ct.memmove(token_in, token_out, 64)

    def table_names(self) -> list[str]:
        """Every map the compiled program has (not only those opened so far)."""
        lib = ct.CDLL("libbcc.so.0")
        lib.bpf_num_tables.restype = ct.c_size_t
        lib.bpf_num_tables.argtypes = [ct.c_void_p]
        lib.bpf_table_name.restype = ct.c_char_p
        lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
        module = self.bpf.module
        return [lib.bpf_table_name(module, i).decode()
                for i in range(lib.bpf_num_tables(module))]

    def key_type(self, name: str) -> type:
        """The ctypes key type BCC compiled for a map (from qtrace.h)."""
        return self.bpf[name].Key

    def events_lost(self) -> dict[str, int]:
        """kind -> ring-buffer events dropped (the ring was full)."""
        table = self.bpf["events_lost"]
        return {name: int(table[ct.c_int(k)].value) for k, name in abi.KINDS.items()}

    def update_failures(self) -> dict[str, int]:
        """map name -> inserts a full map refused."""
        table = self.bpf["update_failed"]
        return {name: int(table[ct.c_int(i)].value) for i, name in enumerate(abi.MAPS)}

    def close(self, keep_pins: bool = False) -> None:
        """Undo everything, last step first; safe to call twice.  keep_pins: pinned maps and
        links stay (a restart continues from them); otherwise they are removed too."""
        while self._undo:
            self._undo.pop()()
        self.bpf = None
        self.state = "closed"
        if self.pin_dir and not keep_pins:
            remove_pins(self.pin_dir)
            with contextlib.suppress(OSError):  # the root too, when this was all it held
                os.rmdir(os.path.dirname(self.pin_dir))


def remove_pins(root: str) -> list[str]:
    """Unpin everything under root (maps and links go once no process holds them)."""
    removed = []
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            os.unlink(os.path.join(dirpath, f))
            removed.append(os.path.join(dirpath, f))
        os.rmdir(dirpath)
    return removed
