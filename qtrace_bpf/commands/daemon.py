"""`qprobe daemon`: every QEMU on the host, from exec to exit, counted in BPF maps.

Uprobes go on the host's QEMU binaries at start (before any VM exists); the kernel starts
tracking a new QEMU at its exec (or its KVM_CREATE_VM), so its boot is counted from the
first state write; user space only learns names for labels.  A periodic rescan is the
safety net.  Series of a VM that quit are dropped after a grace period.  The program is
compiled and pinned by a short-lived loader process (loader.py): this one holds no compiler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import time
from collections.abc import Callable

from qtrace_bpf import __version__, build_info, procfs, revision
from qtrace_bpf.bpf import pins
from qtrace_bpf.commands.config import Config
from qtrace_bpf.commands.service import Notifier, Signals, sock_address, systemd_sockets
from qtrace_bpf.contract.catalog import load_catalog
from qtrace_bpf.errors import RESOURCE_ERRNOS, AttachError, QtraceError
from qtrace_bpf.logfmt import RateLimited, logger_fn, setup
from qtrace_bpf.program import loader
from qtrace_bpf.program.pinned import PinnedProgram
from qtrace_bpf.symbols import resolver
from qtrace_bpf.symbols.binaries import QemuBinaries
from qtrace_bpf.symbols.debuginfod import Debuginfod
from qtrace_bpf.vms import targets
from qtrace_bpf.vms.tracker import TracedVm, Tracker

log = logging.getLogger("qtrace")
STUCK_AFTER = 30.0  # seconds without a turn of the main loop: not alive
# fds kept for what is not a connection: BPF maps and programs, the uprobe links of a few
# QEMU binaries (one each), /proc reads, log and notify sockets, the render threads' files
FD_RESERVE = 256


def fd_budget(configured: int) -> tuple[int, int]:
    """Raise the soft fd limit to the hard one (as Go's runtime does); returns (the limit
    now, connections that fit in it beside FD_RESERVE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, max(16, min(configured, soft - FD_RESERVE))


class Daemon:
    """The program, the binaries and the tracker of one host, and its main loop.

    Built in two steps so that /metrics answers from the first second: __init__ is cheap,
    load() compiles and attaches (seconds), start() scans the host.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.catalog = load_catalog()
        self.log = logger_fn(log)
        self.prog = None  # PinnedProgram; a QtraceProgram when nothing can be pinned
        self.binaries: QemuBinaries | None = None
        self.tracker: Tracker | None = None
        # "VM forgotten" subscribers, handed to the tracker when it is made (the exporter
        # carries a restarted domain's counts over to the VM that keeps its name)
        self.forgotten: list[Callable[[TracedVm], None]] = []
        self.stage = "starting"
        self.ready = False
        self.kubevirt_names = cfg.kubevirt_names
        self._last_scan = 0.0
        self.signals = Signals()
        self.http = None  # the /metrics server, for its self-metrics
        self.stale_layouts: list[str] = []
        self.compiled = True  # False: started from pins that matched, compiling nothing
        self.beat = time.monotonic()  # the main loop's last turn (liveness)
        self.resource_errors: dict[str, int] = {}  # errno name -> times (EMFILE, ...)
        self.log_limited = RateLimited(self.log)

    def pin_dir(self) -> pins.PinDir | None:
        """This layout's pins (pins.layout_name); pins of another layout are removed, and
        the restart counted as a gap."""
        root = self.cfg.bpf_pin_root
        if not root:
            return None
        if not pins.is_bpffs(root):
            self.log("pinning off: not a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
                     level="warning", bpf_pin_root=root)
            return None
        layout = loader.layout_name(self.catalog, self.cfg.max_vms, self.cfg.max_vcpus_per_vm)
        for stale in pins.remove_other_layouts(root, layout):
            self.stale_layouts.append(stale)
            self.log("pins of another layout removed: counts restart", level="warning",
                     stale=stale, layout=layout)
        return pins.PinDir(os.path.join(root, layout))

    def load(self) -> None:
        self.stage = "loading the BPF program"
        cfg = self.cfg
        pin_dir = self.pin_dir()
        if pin_dir is None:  # nowhere to hand the program over: compile in this process
            from qtrace_bpf.program.compiled import QtraceProgram

            self.prog = QtraceProgram(self.catalog, hook=cfg.kernel_hook, log=self.log,
                                      discovery=True, max_vms=cfg.max_vms,
                                      max_vcpus=cfg.max_vcpus_per_vm)
            self.log("no pins: the BPF compiler stays loaded in this process",
                     level="warning")
        else:
            manifest, compiled = loader.ensure(pin_dir.path, cfg.kernel_hook, cfg.max_vms,
                                               cfg.max_vcpus_per_vm, self.log)
            self.prog = PinnedProgram(self.catalog, pin_dir, manifest, log=self.log)
            self.compiled = compiled
            if compiled:
                pin_dir.replaced += manifest.replaced  # the loader replaced these links
        # the config's servers win over an inherited DEBUGINFOD_URLS
        debuginfod = Debuginfod.from_env(self.cfg.debuginfod_urls, self.cfg.debuginfo_cache,
                                         allow_http=cfg.debuginfod_allow_http,
                                         quota=cfg.debuginfo_cache_max_mb << 20)
        partial = debuginfod.remove_partial()
        if partial:
            self.log("half-written debuginfod downloads removed", files=len(partial))
        limits = resolver.Limits(seconds=cfg.resolve_timeout,
                                 cpu_seconds=max(1, int(cfg.resolve_timeout)),
                                 memory_bytes=cfg.resolve_memory_max_mb << 20)
        self.binaries = QemuBinaries(self.catalog, self.prog.attach_binary, cfg.debug_roots,
                                     debuginfod, log=self.log, detach=self.prog.detach_binary,
                                     trusted_uids=cfg.trusted_uids, isolate=True,
                                     limits=limits, tick=self.alive)
        self.tracker = Tracker(self.prog.maps, self.binaries, max_vms=self.cfg.max_vms,
                               grace=self.cfg.grace_period, log=self.log,
                               forgotten=self.forgotten)
        if self.stale_layouts:
            self.tracker.note_gap("layout_replaced", times=len(self.stale_layouts))
        p = self.prog.pins
        if p and p.replaced:
            self.tracker.note_gap("program_replaced")
        if p:
            self.log("pins", dir=p.path, counters="continued" if p.carried else "new",
                     program="compiled" if self.compiled else "reused",
                     links_kept=len(p.kept), links_replaced=len(p.replaced))

    def alive(self) -> None:
        """The loop is busy, not stuck (a resolution in its child, a slow attach)."""
        self.beat = time.monotonic()

    def attach_host_binaries(self) -> set[tuple[int, int]]:
        """The configured QEMU binaries, before any VM exists: VMs are traced from exec.
        Returns the files they name now (kept attached while they do)."""
        named = set()
        for path, skipped in targets.host_binaries(self.cfg.qemu_binaries):
            if skipped:
                self.log(f"binary skipped: {skipped}", level="debug", binary=path)
                continue
            try:
                named.add(self.binaries.get(os.path.realpath(path), path).key)
            except AttachError as exc:
                self.tracker.note_attach_error(exc.reason)
                if exc.reason != "untrusted_binary":  # that one was logged once already
                    self.log("binary not attached", level="warning", binary=path, error=exc)
        return named

    def start(self) -> None:
        self.stage = "attaching QEMU binaries and scanning /proc"
        self.rescan()
        # left by a predecessor, claimed by nothing now
        pruned = self.prog.pins.prune() if self.prog.pins else []
        if pruned:
            self.log("pinned probes nothing uses any more removed", links=len(pruned))
        self.stage = "tracing"
        self.ready = True

    def rescan(self) -> None:
        """/proc, and the configured binaries: a package upgrade's new file is attached here,
        usually before any VM starts from it."""
        self._last_scan = time.monotonic()
        with self.resources("rescan"):
            named = self.attach_host_binaries()
            self.tracker.rescan()
            with self.tracker.lock:  # files no configured path names and no process runs
                in_use = {vm.plan.key for vm in self.tracker.vms.values()}
                self.binaries.drop(named | in_use)

    @contextlib.contextmanager
    def resources(self, during: str):
        """Out of fds, memory or buffers (errors.RESOURCE_ERRNOS) is counted and retried at the next
        turn of the loop, never fatal; one log line a minute per kind."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRNOS:
                raise
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            self.resource_errors[name] = self.resource_errors.get(name, 0) + 1
            self.log_limited(f"{during}_{name}", f"out of resources during {during}: retried",
                             error=exc.strerror)

    def healthy(self) -> tuple[bool, str]:
        """/-/healthy (liveness): the main loop turns; also while starting (a liveness
        probe must not kill a daemon that is still loading its program)."""
        if not self.ready:
            return True, f"alive: {self.stage}"
        stuck = time.monotonic() - self.beat
        if stuck > STUCK_AFTER:
            return False, f"main loop stuck for {stuck:.0f}s"
        return True, "alive: tracing"

    def readiness(self) -> tuple[bool, str]:
        """/-/ready: the kernel hook attached and the first rescan done."""
        if not self.ready:
            return False, f"not ready: {self.stage}"
        plans = list(self.binaries.plans.values())
        ok = sum(len(p.attached) - len(p.missing) for p in plans)
        total = sum(len(p.attached) for p in plans)
        return True, (f"ok: kernel hook {self.prog.hook_mode}, {len(plans)} QEMU binaries, "
                      f"{ok}/{total} probes attached, "
                      f"{sum(1 for v in self.tracker.vms.values() if v.exited_at is None)} "
                      "QEMU processes tracked")

    def run(self, notify=None) -> None:
        """Until SIGTERM/SIGINT.  notify: the systemd watchdog, kicked from this loop (a
        stuck loop is what the watchdog is for)."""
        while not self.signals.stop:
            self.beat = time.monotonic()
            self.prog.poll(200)
            while self.prog.events:
                with self.resources("adopt"):
                    self.tracker.follow(self.prog.events.popleft())
            if self.signals.rescan or \
                    time.monotonic() - self._last_scan >= self.cfg.rescan_interval:
                self.signals.rescan = False
                self.rescan()
            self.tracker.expire()
            if notify is not None:
                notify.watchdog()

    def close(self) -> None:
        """SIGTERM, SIGINT, an error: the pins stay when keep_on_exit (the kernel goes on
        counting, the next daemon continues); all else is released."""
        if self.prog is not None:
            self.prog.close(keep_pins=self.cfg.keep_on_exit)
        if self.binaries is not None:
            self.binaries.close()


def run_daemon(cfg: Config, systemd_socket: bool = False) -> int:
    """Serve /metrics from the first second; trace until SIGTERM/SIGINT; every probe is
    detached on the way out."""
    from qtrace_bpf.exporters.http import Limits, Server, make_app
    from qtrace_bpf.exporters.metrics import Exposition

    setup(cfg.log_level, cfg.log_format)
    procfs.use(cfg.proc_root)  # before any pid is read, or a program compiled
    signals = Signals()
    signals.install()
    started = time.monotonic()
    daemon = Daemon(cfg)
    daemon.log("starting qtrace", version=__version__, **build_info())
    for warning in cfg.web.warnings:  # once: the file is taken, not all of it honoured
        daemon.log(f"web config: {warning}", level="warning")
    daemon.signals = signals
    notify = Notifier(daemon.log)
    exposition = Exposition(daemon)
    daemon.forgotten.append(exposition.vms.carry)
    nofile, connections = fd_budget(cfg.max_connections)
    if connections < cfg.max_connections:
        daemon.log("max_connections capped to fit the fd limit", level="warning",
                   configured=cfg.max_connections, max_connections=connections, nofile=nofile)
    app = make_app(exposition.get, daemon.healthy, daemon.readiness, cfg.telemetry_path,
                   f"qtrace {__version__} (revision {revision()})")
    handed = systemd_sockets() if systemd_socket else None
    server = Server(app, [] if handed else cfg.host_ports, web=cfg.web, sockets=handed,
                    limits=Limits(max_connections=connections), log=daemon.log)
    daemon.http = server  # its connection counters are self-metrics
    try:
        server.start()
    except OSError as exc:
        server.shutdown()
        raise QtraceError(f"cannot listen on {', '.join(cfg.listen)}: {exc.strerror}") \
            from None
    listen = [f"systemd:{sock_address(s)}" for s in handed] if handed \
        else cfg.listen
    daemon.log("listening", listen=",".join(listen), path=cfg.telemetry_path,
               scheme="https" if cfg.web.tls else "http",
               auth="basic" if cfg.web.users else None, max_connections=connections,
               nofile=nofile)
    try:
        notify.send("STATUS=loading the BPF program")
        daemon.load()
        notify.send("STATUS=attaching QEMU binaries, scanning /proc")
        daemon.start()
        daemon.log("tracing", kernel_hook=daemon.prog.hook_mode,
                   binaries=len(daemon.binaries.plans), vms=len(daemon.tracker.vms),
                   ready_in=f"{time.monotonic() - started:.2f}s")
        notify.send(f"READY=1\nSTATUS=tracing with kernel hook {daemon.prog.hook_mode}")
        daemon.run(notify)
        daemon.log("stopping: detaching all probes")
        return 0
    finally:
        notify.send("STOPPING=1")
        server.shutdown()
        daemon.close()
