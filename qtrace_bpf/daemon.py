"""`qprobe daemon`: every QEMU on the host, from exec to exit, counted in BPF maps.

Uprobes go on the host's QEMU binaries at start (before any VM exists); the kernel starts
tracking a new QEMU at its exec (or its KVM_CREATE_VM), so its boot is counted from the
first state write; user space only learns names for labels.  A periodic rescan is the
safety net.  Series of a VM that quit are dropped after a grace period.
"""

from __future__ import annotations

import glob
import logging
import os
import time

from .binaries import Binaries
from .catalog import load_catalog
from .config import Config
from .errors import AttachError, QtraceError
from .logfmt import Formatter, logger_fn
from .program import QtraceProgram
from .tracker import Tracker

log = logging.getLogger("qtrace")


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
    """The program, the binaries and the tracker of one host, and its main loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.catalog = load_catalog()
        self.log = logger_fn(log)
        self.prog = QtraceProgram(self.catalog, hook=cfg.kernel_hook, log=self.log,
                                  discovery=True, max_vms=cfg.max_vms,
                                  max_vcpus=cfg.max_vcpus_per_vm)
        self.binaries = Binaries(self.catalog, self.prog.attach_binary, cfg.debug_roots,
                                 log=self.log)
        self.tracker = Tracker(self.prog, self.binaries, max_vms=cfg.max_vms,
                               grace=cfg.grace_period, log=self.log)
        self._last_scan = 0.0
        self.signals = Signals()
        self.last_scrape_seconds = 0.0  # set by the VM collector

    def attach_host_binaries(self) -> None:
        """The configured QEMU binaries, before any VM exists: VMs are traced from exec."""
        for pattern in self.cfg.qemu_binaries:
            for path in sorted(glob.glob(pattern)):
                if not (os.path.isfile(path) and os.access(path, os.X_OK)):
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
        self.rescan()

    def rescan(self) -> None:
        """/proc, and the configured binaries: a package upgrade's new file is attached here,
        usually before any VM starts from it."""
        self._last_scan = time.monotonic()
        self.attach_host_binaries()
        self.tracker.rescan()

    def run(self) -> None:
        while not self.signals.stop:
            self.prog.poll(200)
            while self.prog.events:
                self.tracker.follow(self.prog.events.popleft())
            if self.signals.rescan or \
                    time.monotonic() - self._last_scan >= self.cfg.rescan_interval:
                self.signals.rescan = False
                self.rescan()
            self.tracker.expire()

    def close(self) -> None:
        self.prog.close()


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) we are ready; a no-op outside systemd."""
    import socket

    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), addr)


def run_daemon(cfg: Config) -> int:
    """Serve /metrics until SIGTERM/SIGINT; every probe is detached on the way out."""

    from prometheus_client import CollectorRegistry

    from qtrace_bpf.exporters.http import serve
    from qtrace_bpf.exporters.metrics import SelfCollector, VmCollector

    handler = logging.StreamHandler()
    handler.setFormatter(Formatter())
    logging.basicConfig(level=cfg.log_level.upper(), handlers=[handler])
    signals = Signals()
    signals.install()
    started = time.monotonic()
    daemon = Daemon(cfg)
    daemon.signals = signals
    server = None
    try:
        daemon.start()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(VmCollector(daemon))
        registry.register(SelfCollector(daemon))
        host, port = cfg.host_port
        try:
            server = serve(registry, host, port, certfile=cfg.tls_cert_file,
                           keyfile=cfg.tls_key_file, client_cafile=cfg.tls_client_ca_file,
                           users=cfg.basic_auth_users)
        except OSError as exc:
            raise QtraceError(f"cannot listen on {cfg.listen}: {exc.strerror}") from None
        daemon.log("listening", listen=cfg.listen,
                   scheme="https" if cfg.tls_cert_file else "http",
                   kernel_hook=daemon.prog.hook_mode, binaries=len(daemon.binaries.plans),
                   vms=len(daemon.tracker.vms), ready_in=f"{time.monotonic() - started:.2f}s")
        _sd_notify("READY=1")
        daemon.run()
        daemon.log("stopping: detaching all probes")
        return 0
    finally:
        _sd_notify("STOPPING=1")
        if server is not None:
            server.shutdown()
        daemon.close()
