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
import threading
import time

from .binaries import Binaries
from .catalog import load_catalog
from .config import Config
from .errors import QtraceError
from .program import QtraceProgram
from .tracker import Tracker

log = logging.getLogger("qtrace")


def _starts_with_elf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return True  # let the resolver report why it cannot be read


class Daemon:
    """The program, the binaries and the tracker of one host, and its main loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.catalog = load_catalog()
        self.prog = QtraceProgram(self.catalog, hook=cfg.kernel_hook, log=log.info,
                                  discovery=True, max_vms=cfg.max_vms,
                                  max_vcpus=cfg.max_vcpus_per_vm)
        self.binaries = Binaries(self.catalog, self.prog.attach_binary, cfg.debug_roots)
        self.tracker = Tracker(self.prog, self.binaries, max_vms=cfg.max_vms,
                               grace=cfg.grace_period, log=log.info)
        self._last_scan = 0.0
        self.last_scrape_seconds = 0.0  # set by the VM collector

    def attach_host_binaries(self) -> None:
        """The configured QEMU binaries, before any VM exists: VMs are traced from exec."""
        for pattern in self.cfg.qemu_binaries:
            for path in sorted(glob.glob(pattern)):
                if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                    continue
                if not _starts_with_elf_magic(path):
                    # e.g. Debian's qemu-system-i386 is a shell wrapper (xen redirect)
                    log.debug("binary=%s skipped: not an ELF file (a wrapper script?)", path)
                    continue
                try:
                    plan = self.binaries.get(os.path.realpath(path), path)
                except QtraceError as exc:
                    log.warning("binary=%s cannot attach: %s", path, exc)
                    continue
                res = plan.resolution
                log.info("binary=%s build_id=%s qemu=%s probes_attached=%d probes_missing=%d",
                         path, res.build_id, res.qemu_version,
                         len(plan.attached) - len(plan.missing), len(plan.missing))
                for a in plan.missing:
                    log.info("binary=%s probe=%s missing: %s", path, a.probe.event, a.reason)

    def start(self) -> None:
        self.attach_host_binaries()
        self.rescan()

    def rescan(self) -> None:
        self._last_scan = time.monotonic()
        self.tracker.rescan()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.prog.poll(200)
            while self.prog.events:
                self.tracker.follow(self.prog.events.popleft())
            if time.monotonic() - self._last_scan >= self.cfg.rescan_interval:
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
    import signal

    from prometheus_client import CollectorRegistry

    from qtrace_bpf.exporters.http import serve
    from qtrace_bpf.exporters.metrics import SelfCollector, VmCollector

    logging.basicConfig(level=cfg.log_level.upper(),
                        format="level=%(levelname)s logger=%(name)s msg=%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    daemon = Daemon(cfg)
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
        log.info("listening on %s (%s) kernel_hook=%s binaries=%d vms=%d ready_in=%.2fs",
                 cfg.listen, "https" if cfg.tls_cert_file else "http",
                 daemon.prog.hook_mode, len(daemon.binaries.plans), len(daemon.tracker.vms),
                 time.monotonic() - started)
        _sd_notify("READY=1")
        daemon.run(stop)
        log.info("stopping: detaching all probes")
        return 0
    finally:
        _sd_notify("STOPPING=1")
        if server is not None:
            server.shutdown()
        daemon.close()
