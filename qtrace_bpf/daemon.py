"""`qprobe daemon`: every QEMU on the host, from exec to exit, counted in BPF maps.

Uprobes go on the host's QEMU binaries at start (before any VM exists); the kernel starts
tracking a new QEMU at its exec (or its KVM_CREATE_VM), so its boot is counted from the
first state write; user space only learns names for labels.  A periodic rescan is the
safety net.  Series of a VM that quit are dropped after a grace period.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import time

from . import abi, links
from .binaries import Binaries
from .catalog import load_catalog
from .config import Config
from .errors import AttachError, QtraceError
from .logfmt import Formatter, logger_fn
from .program import QtraceProgram, remove_pins
from .tracker import Tracker

log = logging.getLogger("qtrace")


# Package managers write the new file beside the old one first (qemu-system-x86_64.dpkg-new,
# qemu-kvm;5f3a9c2e with rpm), then rename it: a glob sees that half-written file.
_TEMP_NAME = re.compile(r"\.(dpkg-(new|tmp|old|dist|bak)|rpm(new|save|orig))$|;[0-9a-f]{8}$")


def _starts_with_elf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return True  # let the resolver report why it cannot be read


class Signals:
    """What signals asked for, as plain attributes.  A handler must not take a lock (an
    Event's): it runs in the main thread between two bytecodes, maybe while that thread
    holds the same lock, and would deadlock."""

    stop = False  # SIGTERM, SIGINT
    rescan = False  # SIGHUP: an operator asks for a /proc rescan now

    def install(self) -> None:
        import signal

        def on_stop(*_: object) -> None:
            self.stop = True

        def on_hup(*_: object) -> None:
            self.rescan = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


class Daemon:
    """The program, the binaries and the tracker of one host, and its main loop.

    Built in two steps so that /metrics answers from the first second: __init__ is cheap,
    load() compiles and attaches (seconds), start() scans the host.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.catalog = load_catalog()
        self.log = logger_fn(log)
        self.prog: QtraceProgram | None = None
        self.binaries: Binaries | None = None
        self.tracker: Tracker | None = None
        self.on_forget = None  # set by the VM collector: a restarted domain's counts carry on
        self.stage = "starting"
        self.ready = False
        self._last_scan = 0.0
        self.signals = Signals()
        self.last_scrape_seconds = 0.0  # set by the VM collector
        self.http = None  # the /metrics server, for its self-metrics
        self.stale_layouts: list[str] = []

    def pin_dir(self) -> str | None:
        """Where this layout's pins live: <root>/v<ABI>-<max_vms>x<max_vcpus>-<catalog>.
        Pins of another layout (an older qtrace, other map sizes, another catalog) are never
        read: removed, and the restart counted as a gap."""
        root = self.cfg.bpf_pin_root
        if not root:
            return None
        if not links.is_bpffs(root):
            self.log("pinning off: not a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
                     level="warning", bpf_pin_root=root)
            return None
        # the catalog's slots key lifecycle counts and name link pins: part of the layout
        slots = "".join(f"{p.slot}:{p.event}:{p.action};" for p in self.catalog.probes)
        catalog = hashlib.sha256(slots.encode()).hexdigest()[:8]
        layout = (f"v{abi.QTRACE_ABI_VERSION}-{self.cfg.max_vms}x{self.cfg.max_vcpus_per_vm}"
                  f"-{catalog}")
        if os.path.isdir(root):
            for stale in sorted(set(os.listdir(root)) - {layout}):
                remove_pins(os.path.join(root, stale))
                self.stale_layouts.append(stale)
                self.log("pins of another layout removed: counts restart", level="warning",
                         stale=stale, layout=layout)
        return os.path.join(root, layout)

    def load(self) -> None:
        # The resolver reads debuginfod servers the way elfutils does, from the environment;
        # the config names them for the daemon (and wins over an inherited variable).
        if self.cfg.debuginfod_urls:
            os.environ["DEBUGINFOD_URLS"] = " ".join(self.cfg.debuginfod_urls)
        os.environ["QTRACE_DEBUGINFO_CACHE"] = self.cfg.debuginfo_cache
        self.stage = "loading the BPF program"
        self.prog = QtraceProgram(self.catalog, hook=self.cfg.kernel_hook, log=self.log,
                                  discovery=True, max_vms=self.cfg.max_vms,
                                  max_vcpus=self.cfg.max_vcpus_per_vm, pin_dir=self.pin_dir())
        self.binaries = Binaries(self.catalog, self.prog.attach_binary, self.cfg.debug_roots,
                                 log=self.log)
        self.tracker = Tracker(self.prog, self.binaries, max_vms=self.cfg.max_vms,
                               grace=self.cfg.grace_period, log=self.log)
        self.tracker.on_forget = self.on_forget
        if self.stale_layouts:
            self.tracker.gaps[("", "layout_replaced")] += len(self.stale_layouts)
        if self.prog.replaced:
            self.tracker.gaps[("", "program_replaced")] += 1
        if self.prog.pin_dir:
            self.log("pins", dir=self.prog.pin_dir, counters="continued" if self.prog.carried
                     else "new", links_kept=len(self.prog.kept),
                     links_replaced=len(self.prog.replaced))

    def attach_host_binaries(self) -> None:
        """The configured QEMU binaries, before any VM exists: VMs are traced from exec."""
        for pattern in self.cfg.qemu_binaries:
            for path in sorted(glob.glob(pattern)):
                if _TEMP_NAME.search(path) or not (os.path.isfile(path) and
                                                   os.access(path, os.X_OK)):
                    continue
                if not _starts_with_elf_magic(path):
                    # e.g. Debian's qemu-system-i386 is a shell wrapper (xen redirect)
                    self.log("binary skipped: not an ELF file (a wrapper script?)",
                             level="debug", binary=path)
                    continue
                try:
                    self.binaries.get(os.path.realpath(path), path)
                except AttachError as exc:
                    self.tracker.attach_errors[exc.reason] = \
                        self.tracker.attach_errors.get(exc.reason, 0) + 1
                    self.log("binary not attached", level="warning", binary=path, error=exc)

    def start(self) -> None:
        self.stage = "attaching QEMU binaries and scanning /proc"
        self.rescan()
        pruned = self.prog.prune_links()  # left by a predecessor, claimed by nothing now
        if pruned:
            self.log("pinned probes nothing uses any more removed", links=len(pruned))
        self.stage = "tracing"
        self.ready = True

    def rescan(self) -> None:
        """/proc, and the configured binaries: a package upgrade's new file is attached here,
        usually before any VM starts from it."""
        self._last_scan = time.monotonic()
        self.attach_host_binaries()
        self.tracker.rescan()

    def healthy(self) -> tuple[bool, str]:
        """/-/healthy: the kernel hook and the binaries' probes attached, events flowing."""
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
            self.prog.poll(200)
            while self.prog.events:
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


class Notifier:
    """sd_notify (Type=notify): READY, STATUS, the watchdog, STOPPING.  A no-op outside
    systemd, and never an error: a failed notification must not skip the shutdown path."""

    def __init__(self, log) -> None:
        import socket

        self.log = log
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.interval = int(usec) / 2e6 if usec.isdigit() else 0.0
        self._kicked = 0.0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.addr else None

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self.addr)
        except OSError as exc:
            self.log("sd_notify failed", level="debug", message=message, error=exc)

    def watchdog(self) -> None:
        if self.interval and time.monotonic() - self._kicked >= self.interval:
            self._kicked = time.monotonic()
            self.send("WATCHDOG=1")


def run_daemon(cfg: Config) -> int:
    """Serve /metrics from the first second; trace until SIGTERM/SIGINT; every probe is
    detached on the way out."""
    from qtrace_bpf.exporters.http import Limits, Server, make_app
    from qtrace_bpf.exporters.metrics import Exposition

    handler = logging.StreamHandler()
    handler.setFormatter(Formatter())
    logging.basicConfig(level=cfg.log_level.upper(), handlers=[handler])
    for warning in cfg.warnings:
        log.warning(warning)
    signals = Signals()
    signals.install()
    started = time.monotonic()
    daemon = Daemon(cfg)
    daemon.signals = signals
    notify = Notifier(daemon.log)
    exposition = Exposition(daemon)
    server = Server(make_app(exposition.get, daemon.healthy), [cfg.host_port], web=cfg.web,
                    limits=Limits(max_connections=cfg.max_connections), log=daemon.log)
    daemon.http = server  # its connection counters are self-metrics
    try:
        server.start()
    except OSError as exc:
        server.shutdown()
        raise QtraceError(f"cannot listen on {cfg.listen}: {exc.strerror}") from None
    daemon.log("listening", listen=cfg.listen, scheme="https" if cfg.web.tls else "http",
               auth="basic" if cfg.web.users else None)
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
